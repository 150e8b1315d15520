/* ioapic: interrupts through the IOAPIC, raised by the host on test IRQ line 10 (port 0x200a):
 *   edge:  vector 0x40, line pulsed high then low: one interrupt, LAPIC EOI;
 *   level: vector 0x41, line held high: the handler EOIs without lowering it the first time (the
 *          IOAPIC delivers again), lowers it and EOIs the second time; then, interrupts still on,
 *          one exit to the host (the line lowered again), so that a host that injects only
 *          at VM entries takes what the IOAPIC still delivered; then it reports the
 *          count and whether remote IRR is clear. Where the LAPIC keeps nothing in service
 *          (kvm_pvm), KVM EOIs a level vector as it injects it: with the line still high the
 *          IOAPIC delivers once more, a third interrupt, taken when the guest re-enters.
 * Long mode (handlers return with iretq); the 8259 is masked. Exit 0 once both counts are reached. */
    .include "kernel.inc"
    .set    PIN, 10
    .set    LINE_PORT, 0x2000 + PIN
    .set    REDIR, 0x10 + 2 * PIN
    .set    WAIT_LOOPS, 2000000
    MULTIBOOT_HEADER
    KERNEL_ENTRY
    ENTER_LONG_MODE long_mode
    .code64
long_mode:
    call    long_mode_common
    mov     $0x40, %edi
    mov     $edge_handler, %rsi
    call    set_gate64
    mov     $0x41, %edi
    mov     $level_handler, %rsi
    call    set_gate64
    mov     $0xff, %al                  /* mask both 8259s */
    out     %al, $0x21
    out     %al, $0xa1
    mov     $LAPIC, %r12                /* the APICs are above 2 GiB: reached through registers */
    mov     $IOAPIC, %r13
    movl    $0x1ff, 0xf0(%r12)          /* software-enable the LAPIC */
    /* edge: pin 10 -> vector 0x40, fixed, physical, edge, active high, to APIC ID 0 */
    mov     $0x40, %eax
    call    set_redirection
    sti
    mov     $LINE_PORT, %dx
    mov     $1, %al
    out     %al, %dx
    mov     $0, %al
    out     %al, %dx
    mov     $edge_count, %rdi
    mov     $1, %eax
    call    wait_count
    mov     $msg_edge, %esi
    call    puts64
    mov     edge_count, %eax
    call    putdec64
    mov     $msg_interrupts, %esi
    call    puts64
    /* level: vector 0x41, level-triggered */
    mov     $0x41 | (1 << 15), %eax
    call    set_redirection
    mov     $1, %al
    out     %al, %dx
    mov     $level_count, %rdi
    mov     $2, %eax
    call    wait_count
    mov     $0, %al                     /* IF=1: lower the (low) line again, an exit to the host whose */
    out     %al, %dx                    /* KVM_RUN injects what is pending */
    cli
    mov     $msg_level, %esi
    call    puts64
    mov     level_count, %eax
    call    putdec64
    mov     $msg_interrupts, %esi
    call    puts64
    movl    $REDIR, (%r13)              /* remote IRR: bit 14 of the low word */
    mov     0x10(%r13), %eax
    test    $1 << 14, %eax
    jnz     1f
    mov     $msg_irr_clear, %esi
    call    puts64
    xor     %eax, %eax
    jmp     exit64
1:  mov     $msg_irr_set, %esi
    call    puts64
    xor     %eax, %eax
    jmp     exit64

/* set_redirection: pin PIN's low word = %eax, high word = destination APIC ID 0 */
set_redirection:
    movl    $REDIR + 1, (%r13)
    movl    $0, 0x10(%r13)
    movl    $REDIR, (%r13)
    mov     %eax, 0x10(%r13)
    ret

/* wait_count: spin until the dword at %rdi reaches %eax; on a timeout, say so and exit 1 */
wait_count:
    mov     $WAIT_LOOPS, %ecx
1:  cmp     %eax, (%rdi)
    jae     2f
    pause
    loop    1b
    mov     $msg_timeout, %esi
    call    puts64
    mov     $1, %eax
    jmp     exit64
2:  ret

edge_handler:
    push    %rax
    incl    edge_count
    movl    $0, 0xb0(%r12)              /* EOI */
    pop     %rax
    iretq

level_handler:
    push    %rax
    incl    level_count
    cmpl    $2, level_count
    jb      1f
    push    %rdx
    mov     $LINE_PORT, %dx             /* the second time: lower the line first */
    mov     $0, %al
    out     %al, %dx
    pop     %rdx
1:  movl    $0, 0xb0(%r12)              /* EOI: the IOAPIC re-delivers if the line is still high */
    pop     %rax
    iretq

    STRING  msg_edge, "ioapic: edge-triggered GSI 10: "
    STRING  msg_level, "ioapic: level-triggered GSI 10: "
    STRING  msg_interrupts, " interrupt(s)\n"
    STRING  msg_irr_clear, "ioapic: remote IRR clear after EOI\n"
    STRING  msg_irr_set, "ioapic: remote IRR still set after EOI\n"
    STRING  msg_timeout, "ioapic: timed out waiting for the interrupt\n"
    .data
edge_count:  .long 0
level_count: .long 0
