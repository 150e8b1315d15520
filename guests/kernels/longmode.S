/* longmode: from the Multiboot entry state (32-bit, paging off) into 64-bit long mode:
 * identity-map 4 GiB, PAE, EFER.LME, paging; then check EFER.LMA and use a 64-bit register. */
    .include "kernel.inc"
    MULTIBOOT_HEADER
    KERNEL_ENTRY
    mov     $msg_entering, %esi
    call    puts32
    ENTER_LONG_MODE long_mode
    .code64
long_mode:
    call    long_mode_common
    mov     $0xC0000080, %ecx
    rdmsr
    test    $0x400, %eax                /* EFER.LMA */
    jz      1f
    mov     $msg_active, %esi
    call    puts64
    mov     $0x0123456789abcdef, %rax
    call    puthex64
    mov     $'\n', %al
    call    putc64
    xor     %eax, %eax
    jmp     exit64
1:  mov     $msg_inactive, %esi
    call    puts64
    mov     $1, %eax
    jmp     exit64
    STRING  msg_entering, "longmode: entering long mode\n"
    STRING  msg_active, "longmode: EFER.LMA set, 64-bit register "
    STRING  msg_inactive, "longmode: EFER.LMA clear\n"
