/* cpuid: print every CPUID leaf the BSP sees, then MCG_CAP, then exit with 0.
 * One line per leaf and sub-leaf: "cpuid LLLLLLLL.SS: EAX EBX ECX EDX" (hex), for the basic
 * leaves 0..max, the hypervisor leaves 0x40000000..max (when leaf 0x40000000 answers a max in
 * that range) and the extended leaves 0x80000000..max. The indexed leaves listed in `indexed`
 * print sub-leaves 0..count-1; every other leaf prints sub-leaf 0 only. With CPUID.1:EDX MCE
 * and MCA set, a last line "mcg_cap HHHHHHHHLLLLLLLL" gives MSR 0x179. pykvm's CPU-model tests
 * and a QEMU run of the same image compare these lines. */
    .include "kernel.inc"
    MULTIBOOT_HEADER
    KERNEL_ENTRY
    xor     %eax, %eax
    call    dump_range
    mov     $0x40000000, %eax
    xor     %ecx, %ecx
    cpuid
    mov     %eax, %edx
    sub     $0x40000000, %edx
    cmp     $0xff, %edx                 /* no hypervisor leaves: EAX is not a leaf in range */
    ja      1f
    mov     $0x40000000, %eax
    call    dump_range
1:  mov     $0x80000000, %eax
    call    dump_range
    mov     $1, %eax
    cpuid
    and     $0x4080, %edx               /* MCE (bit 7) and MCA (bit 14) */
    cmp     $0x4080, %edx
    jne     2f
    mov     $msg_mcg_cap, %esi
    call    puts32
    mov     $0x179, %ecx
    rdmsr
    xchg    %eax, %edx
    call    hex8_32
    mov     %edx, %eax
    call    hex8_32
    mov     $'\n', %al
    call    putc32
2:  mov     $msg_done, %esi
    call    puts32
    xor     %eax, %eax
    jmp     exit32

/* dump_range: print leaves %eax .. CPUID(%eax).EAX (at most 0x100 of them). Clobbers EAX-EDI. */
dump_range:
    mov     %eax, %edi                  /* the current leaf */
    xor     %ecx, %ecx
    cpuid
    mov     %eax, %ebp                  /* the range's max leaf */
    lea     0xff(%edi), %eax
    cmp     %eax, %ebp
    jbe     1f
    mov     %eax, %ebp
1:  mov     %edi, %eax
    call    subleaf_count
    xor     %esi, %esi                  /* the sub-leaf */
2:  push    %ecx
    mov     %edi, %eax
    mov     %esi, %ecx
    call    print_leaf
    pop     %ecx
    inc     %esi
    cmp     %ecx, %esi
    jb      2b
    inc     %edi
    cmp     %ebp, %edi
    jbe     1b
    ret

/* subleaf_count: %ecx = how many sub-leaves of leaf %eax to print. */
subleaf_count:
    push    %esi
    mov     $indexed, %esi
1:  mov     (%esi), %ecx
    test    %ecx, %ecx
    jz      2f
    cmp     %eax, %ecx
    je      3f
    add     $8, %esi
    jmp     1b
2:  mov     $1, %ecx
    pop     %esi
    ret
3:  mov     4(%esi), %ecx
    pop     %esi
    ret

/* print_leaf: one line for CPUID leaf %eax, sub-leaf %ecx. Clobbers EAX-EDX. */
print_leaf:
    push    %esi
    push    %ecx
    push    %eax
    mov     $msg_cpuid, %esi
    call    puts32
    call    hex8_32
    mov     $'.', %al
    call    putc32
    mov     %ecx, %eax
    call    hex8_32
    mov     $':', %al
    call    putc32
    pop     %eax
    cpuid
    push    %edx
    push    %ecx
    push    %ebx
    push    %eax
    mov     $4, %ecx
1:  mov     $' ', %al
    call    putc32
    pop     %eax
    call    hex8_32
    loop    1b
    mov     $'\n', %al
    call    putc32
    pop     %ecx
    pop     %esi
    ret

    STRING  msg_cpuid, "cpuid "
    STRING  msg_mcg_cap, "mcg_cap "
    STRING  msg_done, "done\n"
    .section .rodata
    .align  4
indexed:                                /* leaf, sub-leaves to print; 0 ends */
    .long   0x4, 8, 0x7, 2, 0xb, 3, 0xd, 32, 0xf, 2, 0x10, 4, 0x12, 4, 0x14, 2, 0x17, 4
    .long   0x18, 4, 0x1d, 2, 0x1e, 2, 0x1f, 6, 0x20, 2, 0x24, 2, 0x8000001d, 8, 0x80000020, 4
    .long   0
    .text
