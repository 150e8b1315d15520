/* exitcode: end the way the Multiboot command line says, after printing what it read.
 * The first word is the kernel's name (argv[0], as QEMU's and pykvm's loaders give it) and is
 * skipped; then the first of these found ends the run:
 *   exit=N    write N (decimal) to the debug-exit port: status (N << 1) | 1
 *   triple    load an empty IDT and fault: a triple fault
 *   unknown   touch unknown port 0x1234 and unknown MMIO at 0xd0000000, then exit=0
 *   hang      halt with interrupts off, forever (for timeouts and Ctrl-C)
 * Nothing (or anything else) exits with 0. */
    .include "kernel.inc"
    MULTIBOOT_HEADER
    KERNEL_ENTRY
    mov     $msg_cmdline, %esi
    call    puts32
    xor     %esi, %esi
    testl   $4, (%ebx)                  /* flags bit 2: cmdline valid */
    jz      1f
    mov     16(%ebx), %esi
    call    puts32
1:  mov     $'\n', %al
    call    putc32
    test    %esi, %esi
    jz      exit_zero
skip_name:                              /* past argv[0]: up to the first space */
    cmpb    $0, (%esi)
    je      exit_zero
    cmpb    $0x20, (%esi)
    je      next_word
    inc     %esi
    jmp     skip_name
    /* find a word: "exit=", "triple" or "unknown" */
next_word:
    cmpb    $0, (%esi)
    je      exit_zero
    cmpl    $0x74697865, (%esi)         /* "exit" */
    jne     2f
    cmpb    $'=', 4(%esi)
    jne     2f
    add     $5, %esi
    xor     %eax, %eax
3:  movzbl  (%esi), %ecx
    sub     $'0', %ecx
    cmp     $9, %ecx
    ja      4f
    imul    $10, %eax
    add     %ecx, %eax
    inc     %esi
    jmp     3b
4:  push    %eax
    mov     $msg_exit, %esi
    call    puts32
    call    putdec32
    mov     $'\n', %al
    call    putc32
    pop     %eax
    jmp     exit32
2:  cmpl    $0x70697274, (%esi)         /* "trip" */
    jne     5f
    mov     $msg_triple, %esi
    call    puts32
    lidt    empty_idt
    ud2
5:  cmpl    $0x6e6b6e75, (%esi)         /* "unkn" */
    jne     6f
    mov     $msg_unknown, %esi
    call    puts32
    mov     $0x1234, %dx
    in      %dx, %al
    out     %al, %dx
    mov     0xd0000000, %eax
    movl    $1, 0xd0000000
    jmp     exit_zero
6:  cmpl    $0x676e6168, (%esi)         /* "hang" */
    jne     7f
    mov     $msg_hang, %esi
    call    puts32
8:  cli
    hlt
    jmp     8b
7:  inc     %esi
    jmp     next_word
exit_zero:
    xor     %eax, %eax
    jmp     exit32
    STRING  msg_cmdline, "command line: "
    STRING  msg_exit, "exiting with "
    STRING  msg_triple, "triple fault\n"
    STRING  msg_unknown, "unknown port and MMIO\n"
    STRING  msg_hang, "halting forever\n"
    .section .rodata
    .align  8
empty_idt: .word 0
    .long 0
