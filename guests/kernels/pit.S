/* pit: program the 8254 (channel 0, mode 2, 100 Hz) and the 8259 (IRQ 0 -> vector 0x20), take 10
 * timer interrupts in long mode (handler: count, EOI to the PIC, iretq), then exit 0. */
    .include "kernel.inc"
    .set    TICKS, 10
    MULTIBOOT_HEADER
    KERNEL_ENTRY
    ENTER_LONG_MODE long_mode
    .code64
long_mode:
    call    long_mode_common
    mov     $0x20, %edi
    mov     $timer, %rsi
    call    set_gate64
    /* the LAPIC passes the PIC's ExtINT on: software-enable it, LVT0 = ExtINT */
    mov     $LAPIC, %rdi                /* (above 2 GiB: not a 64-bit displacement) */
    movl    $0x1ff, 0xf0(%rdi)
    movl    $0x700, 0x350(%rdi)
    /* 8259: ICW1-4, master at vector 0x20, slave at 0x28; only IRQ 0 unmasked */
    mov     $0x11, %al
    out     %al, $0x20
    out     %al, $0xa0
    mov     $0x20, %al
    out     %al, $0x21
    mov     $0x28, %al
    out     %al, $0xa1
    mov     $4, %al
    out     %al, $0x21
    mov     $2, %al
    out     %al, $0xa1
    mov     $1, %al
    out     %al, $0x21
    out     %al, $0xa1
    mov     $0xfe, %al
    out     %al, $0x21
    mov     $0xff, %al
    out     %al, $0xa1
    /* the message first: its bytes are exits to the host, and the ticks must all come while the guest
       waits inside KVM_RUN (a host slow to answer those exits would otherwise see ticks go by outside it) */
    mov     $msg_start, %esi
    call    puts64
    /* 8254 channel 0: lobyte/hibyte, mode 2, divisor 11932 (100 Hz) */
    mov     $0x34, %al
    out     %al, $0x43
    mov     $11932 & 0xff, %al
    out     %al, $0x40
    mov     $11932 >> 8, %al
    out     %al, $0x40
1:  sti
    hlt                                 /* sti; hlt: no interrupt slips in between */
    cli
    cmpl    $TICKS, ticks
    jb      1b
    mov     $msg_done, %esi
    call    puts64
    mov     $TICKS, %eax
    call    putdec64
    mov     $msg_ticks, %esi
    call    puts64
    xor     %eax, %eax
    jmp     exit64
timer:
    push    %rax
    incl    ticks
    mov     $0x20, %al                  /* non-specific EOI */
    out     %al, $0x20
    pop     %rax
    iretq
    STRING  msg_start, "pit: 8254 at 100 Hz on IRQ 0, 8259 at vector 0x20\n"
    STRING  msg_done, "pit: took "
    STRING  msg_ticks, " timer interrupts\n"
    .data
ticks:  .long 0
