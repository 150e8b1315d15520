/* smp: start every AP with INIT and SIPI from the BSP (broadcast to all but self); each AP runs a
 * real-mode trampoline at 0x8000, enters 32-bit protected mode and reports its APIC ID. The BSP
 * reads NB_CPUS from fw_cfg and waits for all of them. */
    .include "kernel.inc"
    .set    TRAMPOLINE, 0x8000
    .set    AP_STACK, 1024
    .set    MAX_APS, 64
    .set    WAIT_LOOPS, 50000000
    MULTIBOOT_HEADER
    KERNEL_ENTRY
    mov     $0x05, %eax                 /* FW_CFG_NB_CPUS */
    call    fw_cfg_select
    call    fw_cfg_read32
    mov     %eax, cpus
    movl    $0x1ff, LAPIC + 0xf0        /* software-enable the BSP's LAPIC */
    mov     $msg_bsp, %esi
    call    puts32
    mov     LAPIC + 0x20, %eax
    shr     $24, %eax
    call    putdec32
    mov     $msg_of, %esi
    call    puts32
    mov     cpus, %eax
    call    putdec32
    mov     $msg_cpus, %esi
    call    puts32
    cmpl    $1, cpus
    je      all_up
    /* copy the trampoline below 1 MiB */
    mov     $trampoline, %esi
    mov     $TRAMPOLINE, %edi
    mov     $trampoline_end - trampoline, %ecx
    rep movsb
    movl    $0, LAPIC + 0x310
    movl    $0x000c4500, LAPIC + 0x300  /* INIT, assert, all excluding self */
    call    icr_wait
    call    delay
    mov     $2, %ebx
1:  movl    $0, LAPIC + 0x310
    movl    $0x000c4600 | (TRAMPOLINE >> 12), LAPIC + 0x300   /* STARTUP at 0x8000 */
    call    icr_wait
    call    delay
    dec     %ebx
    jnz     1b
    mov     $WAIT_LOOPS, %ecx
2:  mov     ap_count, %eax
    inc     %eax
    cmp     cpus, %eax
    jae     all_up
    pause
    loop    2b
    mov     $msg_timeout, %esi
    call    puts32
    mov     $1, %eax
    jmp     exit32
all_up:
    call    lock_serial
    mov     $msg_up, %esi
    call    puts32
    mov     cpus, %eax
    call    putdec32
    mov     $msg_cpus_up, %esi
    call    puts32
    xor     %eax, %eax
    jmp     exit32

icr_wait:
    testl   $1 << 12, LAPIC + 0x300     /* delivery status */
    jz      1f
    pause
    jmp     icr_wait
1:  ret

delay:
    push    %ecx
    mov     $1000, %ecx
1:  pause
    loop    1b
    pop     %ecx
    ret

lock_serial:
    push    %eax
1:  mov     $1, %eax
    xchg    %eax, serial_lock
    test    %eax, %eax
    jz      2f
    pause
    jmp     1b
2:  pop     %eax
    ret

/* Each AP: from the trampoline, in 32-bit protected mode with flat segments. */
ap_entry32:
    mov     $0x10, %ax
    mov     %ax, %ds
    mov     %ax, %es
    mov     %ax, %ss
    mov     $1, %eax
    lock xadd %eax, ap_next             /* this AP's stack slot */
    and     $MAX_APS - 1, %eax
    inc     %eax
    imul    $AP_STACK, %eax
    add     $ap_stacks, %eax
    mov     %eax, %esp
    call    lock_serial
    mov     $msg_ap, %esi
    call    puts32
    mov     LAPIC + 0x20, %eax
    shr     $24, %eax
    call    putdec32
    mov     $msg_started, %esi
    call    puts32
    movl    $0, serial_lock
    lock incl ap_count
1:  cli
    hlt
    jmp     1b

/* Real mode at 0x8000 (copied there); CS = 0x800, so the data below are reached with DS = 0. */
    .code16
trampoline:
    cli
    xor     %ax, %ax
    mov     %ax, %ds
    lgdtl   TRAMPOLINE + (trampoline_gdt - trampoline)
    mov     %cr0, %eax
    or      $1, %eax
    mov     %eax, %cr0
    ljmpl   $0x18, $ap_entry32
    .align  4
trampoline_gdt:
    .word   gdt64_end - gdt64 - 1
    .long   gdt64
trampoline_end:
    .code32

    STRING  msg_bsp, "smp: BSP APIC ID "
    STRING  msg_of, ", fw_cfg NB_CPUS "
    STRING  msg_cpus, "\n"
    STRING  msg_ap, "smp: AP APIC ID "
    STRING  msg_started, " started\n"
    STRING  msg_up, "smp: "
    STRING  msg_cpus_up, " CPUs up\n"
    STRING  msg_timeout, "smp: timed out waiting for the APs\n"
    .data
cpus:        .long 0
ap_count:    .long 0
ap_next:     .long 0
serial_lock: .long 0
    .bss
    .align  16
ap_stacks:   .skip AP_STACK * (MAX_APS + 1)
