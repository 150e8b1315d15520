/*
 * pykvm guest image, 32-bit protected mode (paging off).
 *
 * Entered at `entry` (= CODE) by pykvm.x86.enter_protected_mode: CS =
 * SEL_CODE32 and flat SEL_DATA segments (4 GiB), ESP = STACK_TOP, IF = 0.
 * Labels are linear addresses. All numbers come from pykvm/guests/layout.py
 * (--defsym).
 *
 * 1. init: vector log header, initial APIC ID, IDT of 256 32-bit interrupt
 *    gates pointing at 16-byte stubs, lidt.
 * 2. loop: MB_STEP = step; `out %eax, $PORT_SYNC` (eax = step); run the
 *    command the host left at MB_COMMAND / MB_ARG; step++. The step counter
 *    lives in %ebp (no command touches it; handlers preserve it).
 * 3. every vector: stub (saves EAX, EDX; rdtsc) -> handler_common, which
 *    appends a record to the log (its TSC is the stub's),
 *    optionally `out`s the vector to PORT_VECTOR, resumes an expected
 *    exception at MB_FIXUP and returns with IRET.
 *
 * Sizes: vector stubs 16 bytes (stub n at vector_stubs + 16*n); int_table
 * entries 4 bytes (`int $n` at int_table + 4*n).
 */
    .set    BITS, 32
    .include "common.inc"
    .set    STUB_SIZE, 16

    .text
entry:
    movl    $0, LOG                     /* log header: count = 0, capacity */
    movl    $LOG_CAPACITY, LOG+4
    mov     $1, %eax                    /* initial APIC ID: CPUID.1:EBX[31:24] */
    cpuid
    shr     $24, %ebx
    mov     %ebx, MAILBOX+MB_CPU

    mov     $vector_stubs, %eax         /* IDT: 256 8-byte interrupt gates */
    mov     $IDT, %edi
    mov     $256, %ecx
1:  mov     %ax, (%edi)                 /* offset 15:0 */
    movw    $SEL_CODE32, 2(%edi)        /* selector */
    movw    $0x8E00, 4(%edi)            /* P=1, DPL 0, type 0xE (32-bit interrupt gate) */
    mov     %eax, %edx
    shr     $16, %edx
    mov     %dx, 6(%edi)                /* offset 31:16 */
    add     $STUB_SIZE, %eax
    add     $8, %edi
    dec     %ecx
    jnz     1b
    lidt    idt_descriptor

    xor     %ebp, %ebp                  /* step = 0 */
main_loop:
    mov     %ebp, MAILBOX+MB_STEP
    mov     %ebp, %eax
sync_out:
    out     %eax, $PORT_SYNC
sync_done:
    mov     MAILBOX+MB_COMMAND, %eax
    cmp     $CMD_DONE, %eax
    ja      bad_command
    mov     MAILBOX+MB_ARG, %ecx
    jmp     *command_table(,%eax,4)
next_step:
    inc     %ebp
    jmp     main_loop

    simple_commands


    raise_commands

/* INT: `int $MB_ARG` (low byte) through int_table. */
cmd_int:
    movzbl  MAILBOX+MB_ARG, %eax
    lea     int_table(,%eax,INT_ENTRY_SIZE), %eax
    call    *%eax
int_done:
    jmp     next_step

    done_command

    int_table_entries

/* ---- interrupt and exception handlers ---------------------------------------- */
    vector_stub_table STUB_SIZE, 1

/*
 * On entry: edx:eax = the TSC the stub read (two pushes after the delivery);
 * (%esp) = vector [| STUB_ERROR_CODE], 4 = interrupted EDX, 8 = interrupted
 * EAX, 12 = the CPU's error code if it pushed one, else EIP. CPL 0 to CPL 0:
 * no stack switch, so the interrupted ESP is just above EFLAGS.
 */
handler_common:
    testl   $STUB_ERROR_CODE, (%esp)
    jz      insert_error_code
    /* The stub expected a CPU error code. Software `int n` and injected
     * external interrupts push none: then the slot after the saved EAX holds
     * EIP, the next CS and the next EFLAGS (bit 1 always set; a CS selector
     * of RPL 0 has it clear). */
    push    %ecx
    mov     %cs, %ecx
    cmp     %cx, 4+16(%esp)
    jne     1f
    testb   $2, 4+20(%esp)
    jz      1f
    pop     %ecx
    andl    $0xFF, (%esp)               /* untag: no CPU error code */
    jmp     insert_error_code
1:  pop     %ecx
    jmp     frame_ready
insert_error_code:                      /* a dummy 0 below the CPU's frame: move the */
    sub     $4, %esp                    /* stub's three slots down by one */
    push    %ecx
    mov     8(%esp), %ecx
    mov     %ecx, 4(%esp)
    mov     12(%esp), %ecx
    mov     %ecx, 8(%esp)
    mov     16(%esp), %ecx
    mov     %ecx, 12(%esp)
    movl    $0, 16(%esp)
    pop     %ecx
frame_ready:
    pushal                              /* its EAX and EDX slots hold the TSC */
    .set    FRAME, 8 * 4                /* pushal; then the uniform frame: */
    .set    FRAME_TSC_LO, 7 * 4         /* pushal's EAX */
    .set    FRAME_TSC_HI, 5 * 4         /* pushal's EDX */
    .set    F_ERROR, FRAME + 12         /* (FRAME = vector, +4 EDX, +8 EAX) error code, */
    .set    F_EIP, FRAME + 16           /* then the CPU's EIP, CS, EFLAGS */
    .set    F_CS, FRAME + 20
    .set    F_EFLAGS, FRAME + 24
    .set    F_ESP, FRAME + 28           /* where the interrupted ESP pointed */

    mov     LOG, %ebx                   /* ebx = count */
    mov     %ebx, %eax                  /* edi = LOG + header + (count % capacity) * size */
    xor     %edx, %edx
    mov     $LOG_CAPACITY, %ecx
    div     %ecx
    imul    $LOG_RECORD_SIZE, %edx, %edi
    add     $(LOG + LOG_HEADER_SIZE), %edi

    mov     %ebx, REC_SEQ(%edi)
    movzbl  FRAME(%esp), %eax
    mov     %ax, REC_VECTOR(%edi)
    mov     F_CS(%esp), %ecx
    mov     %cx, REC_CS(%edi)
    mov     F_ERROR(%esp), %ecx
    mov     %ecx, REC_ERROR_CODE(%edi)
    mov     F_EIP(%esp), %ecx
    mov     %ecx, REC_RIP(%edi)
    movl    $0, REC_RIP+4(%edi)
    mov     F_EFLAGS(%esp), %ecx
    mov     %ecx, REC_RFLAGS(%edi)
    movl    $0, REC_RFLAGS+4(%edi)
    lea     F_ESP(%esp), %ecx           /* ESP before the CPU pushed its frame */
    mov     %ecx, REC_RSP(%edi)
    movl    $0, REC_RSP+4(%edi)
    mov     MAILBOX+MB_CPU, %ecx
    mov     %ecx, REC_CPU(%edi)
    movl    $0, REC_CPU+4(%edi)         /* rest of the record */
    mov     FRAME_TSC_LO(%esp), %ecx    /* the stub's TSC */
    mov     %ecx, REC_TSC(%edi)
    mov     FRAME_TSC_HI(%esp), %ecx
    mov     %ecx, REC_TSC+4(%edi)
    movl    $0, REC_CR2(%edi)
    movl    $0, REC_CR2+4(%edi)

    xor     %esi, %esi                  /* esi = record flags */
    movzwl  FRAME(%esp), %eax           /* vector | STUB_ERROR_CODE */
    test    $STUB_ERROR_CODE, %eax
    jz      1f
    or      $REC_FLAG_ERROR_CODE, %esi
    cmp     $(14 | STUB_ERROR_CODE), %eax
    jne     1f
    mov     %cr2, %ecx                  /* a real page fault */
    mov     %ecx, REC_CR2(%edi)
    or      $REC_FLAG_CR2, %esi
1:  movzbl  %al, %eax                   /* eax = vector */
    cmp     $32, %eax
    jae     2f
    mov     MAILBOX+MB_FIXUP, %ecx      /* an expected exception: resume there */
    or      MAILBOX+MB_FIXUP+4, %ecx
    jz      2f
    mov     MAILBOX+MB_FIXUP, %ecx
    mov     %ecx, F_EIP(%esp)
    movl    $0, MAILBOX+MB_FIXUP
    movl    $0, MAILBOX+MB_FIXUP+4
    or      $REC_FLAG_FIXUP, %esi
2:  mov     %esi, REC_FLAGS(%edi)
    inc     %ebx                        /* publish the complete record */
    mov     %ebx, LOG

    cmpl    $0, MAILBOX+MB_NOTIFY
    je      3f
handler_notify_out:
    out     %al, $PORT_VECTOR
3:  popal
    mov     4(%esp), %edx
    mov     8(%esp), %eax
    add     $16, %esp                   /* vector, EDX, EAX, error code */
handler_iret:
    iretl

    .section .rodata
    .balign 4
command_table:                          /* indexed by Command */
    .long   cmd_nop, cmd_cli, cmd_sti, cmd_sti_nop, cmd_mov_ss, cmd_hlt
    .long   cmd_sti_hlt, cmd_spin, cmd_raise, cmd_int
    .long   cmd_unsupported, cmd_unsupported, cmd_unsupported, cmd_unsupported  /* APIC_*, IOAPIC_WRITE */
    .long   cmd_unsupported, cmd_unsupported, cmd_unsupported                  /* WRMSR, TSC_DEADLINE, WAIT_LOG */
    .long   cmd_pic_init, cmd_done
command_table_end:
    .if     (command_table_end - command_table) <> 4 * (CMD_DONE + 1)
    .error  "command_table does not match pykvm.guests.protocol.Command"
    .endif
    .balign 4
idt_descriptor:
    .word   256 * 8 - 1
    .long   IDT
