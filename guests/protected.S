/*
 * pykvm guest image, 32-bit protected mode (no paging).
 *
 * The host (pykvm.x86.enter_protected_mode) starts us at `entry` with flat
 * 4 GiB segments, ESP = STACK_TOP and IF = 0. We install an IDT of 32-bit
 * interrupt gates for all 256 vectors, then loop: report a step on PORT_SYNC,
 * run the command the host left in the mailbox. Every handler appends a record
 * to the vector log and returns with IRET. All numbers come from
 * pykvm/layout.py as --defsym values.
 */
    .text
entry:
    mov     $vector_stubs, %eax         /* IDT: 8-byte interrupt gates */
    mov     $IDT, %edi
    xor     %ecx, %ecx
1:  mov     %ax, (%edi)                 /* offset 15:0 */
    movw    $SEL_CODE32, 2(%edi)
    movw    $0x8E00, 4(%edi)            /* present, DPL 0, 32-bit interrupt gate */
    mov     %eax, %edx
    shr     $16, %edx
    mov     %dx, 6(%edi)                /* offset 31:16 */
    add     $STUB_SIZE, %eax
    add     $8, %edi
    inc     %ecx
    cmp     $256, %ecx
    jne     1b
    lidt    idt_pointer
    movl    $0, LOG                     /* log header: count, capacity */
    movl    $LOG_CAPACITY, LOG+4
    mov     $1, %eax                    /* initial APIC ID, for the records */
    cpuid
    shr     $24, %ebx
    mov     %ebx, MAILBOX+MB_CPU
    movl    $0, MAILBOX+MB_STEP

main_loop:
    mov     MAILBOX+MB_STEP, %eax
sync_out:
    out     %eax, $PORT_SYNC
sync_done:
    mov     MAILBOX+MB_COMMAND, %eax
    cmp     $CMD_DONE, %eax
    ja      bad_command
    jmp     *command_table(,%eax,4)
next_step:
    incl    MAILBOX+MB_STEP
    jmp     main_loop

bad_command:
    or      $0x200, %eax
    out     %eax, $PORT_ASSERT
    jmp     next_step

    .include "commands.inc"

cmd_raise:                              /* faults resume at raise_N_end via MB_FIXUP */
    mov     MAILBOX+MB_ARG, %eax
    cmp     $0, %eax
    je      do_raise_0
    cmp     $3, %eax
    je      do_raise_3
    cmp     $6, %eax
    je      do_raise_6
    cmp     $13, %eax
    je      do_raise_13
    or      $0x100, %eax
    out     %eax, $PORT_ASSERT
    jmp     next_step
do_raise_0:
    movl    $raise_0_end, MAILBOX+MB_FIXUP
    xor     %edx, %edx
    xor     %ecx, %ecx
raise_0:
    div     %ecx
raise_0_end:
    jmp     next_step
do_raise_3:
raise_3:
    int3
raise_3_end:
    jmp     next_step
do_raise_6:
    movl    $raise_6_end, MAILBOX+MB_FIXUP
raise_6:
    ud2
raise_6_end:
    jmp     next_step
do_raise_13:
    movl    $raise_13_end, MAILBOX+MB_FIXUP
    mov     $0x1234, %ax                /* beyond the GDT limit: #GP(0x1234) */
raise_13:
    mov     %ax, %ds
raise_13_end:
    jmp     next_step

cmd_int:                                /* int $MB_ARG through a table of 4-byte entries */
    movzbl  MAILBOX+MB_ARG, %eax
    lea     int_table(,%eax,4), %eax
    call    *%eax
    jmp     next_step

cmd_done:
    mov     MAILBOX+MB_STEP, %eax
done_out:
    out     %eax, $PORT_DONE
1:  cli
    hlt
    jmp     1b

/* ---- interrupt handlers ------------------------------------------------- */
    .set    STUB_SIZE, 16
    /* vectors that push an error code: 8, 10-14, 17, 21, 29, 30 */
    .set    ERROR_CODE_MASK, 0x60227D00

    .altmacro
    .macro  vector_stub n
    .balign STUB_SIZE
    .if     ((ERROR_CODE_MASK >> \n) & 1) == 0 || \n >= 32
    pushl   $0                          /* dummy error code */
    .endif
    pushl   $\n
    jmp     handler_common
    .endm

    .balign STUB_SIZE
vector_stubs:
    .set    vector, 0
    .rept   256
    vector_stub %vector
    .set    vector, vector + 1
    .endr

/* Stack: vector, error code, EIP, CS, EFLAGS (4 bytes each; no stack switch at CPL 0). */
handler_common:
    pushal
    .set    FRAME, 32                   /* pushal */
    mov     LOG, %ebx                   /* record = LOG + header + (count % capacity) * 64 */
    mov     %ebx, %eax
    xor     %edx, %edx
    mov     $LOG_CAPACITY, %ecx
    div     %ecx
    imul    $LOG_RECORD_SIZE, %edx, %edi
    add     $(LOG + LOG_HEADER_SIZE), %edi
    mov     %ebx, REC_SEQ(%edi)
    mov     FRAME+12(%esp), %ecx
    mov     %cx, REC_CS(%edi)
    mov     FRAME+4(%esp), %ecx
    mov     %ecx, REC_ERROR_CODE(%edi)
    mov     FRAME+8(%esp), %ecx
    mov     %ecx, REC_RIP(%edi)
    movl    $0, REC_RIP+4(%edi)
    mov     FRAME+16(%esp), %ecx
    mov     %ecx, REC_RFLAGS(%edi)
    movl    $0, REC_RFLAGS+4(%edi)
    lea     FRAME+20(%esp), %ecx        /* ESP before the CPU pushed the frame */
    mov     %ecx, REC_RSP(%edi)
    movl    $0, REC_RSP+4(%edi)
    mov     MAILBOX+MB_CPU, %ecx
    mov     %ecx, REC_CPU(%edi)
    movl    $0, REC_CPU+4(%edi)
    rdtsc
    mov     %eax, REC_TSC(%edi)
    mov     %edx, REC_TSC+4(%edi)
    movl    $0, REC_CR2(%edi)
    movl    $0, REC_CR2+4(%edi)
    mov     FRAME(%esp), %eax           /* vector */
    mov     %ax, REC_VECTOR(%edi)
    xor     %esi, %esi                  /* record flags */
    cmp     $32, %eax
    jae     2f
    mov     $ERROR_CODE_MASK, %ecx
    bt      %eax, %ecx
    jnc     1f
    or      $REC_FLAG_ERROR_CODE, %esi
1:  mov     MAILBOX+MB_FIXUP, %ecx      /* an expected exception: resume after it */
    test    %ecx, %ecx
    jz      2f
    mov     %ecx, FRAME+8(%esp)
    movl    $0, MAILBOX+MB_FIXUP
    or      $REC_FLAG_FIXUP, %esi
2:  mov     %esi, REC_FLAGS(%edi)
    inc     %ebx                        /* publish the record */
    mov     %ebx, LOG
    cmpl    $0, MAILBOX+MB_NOTIFY
    je      3f
handler_notify_out:
    out     %al, $PORT_VECTOR
3:  popal
    add     $8, %esp                    /* vector, error code */
handler_iret:
    iret

    .include "int_table.inc"

    .data
    .balign 4
command_table:
    .long   cmd_nop, cmd_cli, cmd_sti, cmd_sti_nop, cmd_mov_ss, cmd_hlt
    .long   cmd_sti_hlt, cmd_spin, cmd_raise, cmd_int, cmd_done
idt_pointer:
    .word   256 * 8 - 1
    .long   IDT
