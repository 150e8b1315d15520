/*
 * pykvm guest image, 16-bit real mode.
 *
 * The host (pykvm.x86.enter_real_mode) starts us at CS:IP = REAL_MODE_CS:0
 * with DS = ES = SS = 0, SP = STACK_TOP and IF = 0; labels are IP offsets.
 * We fill the IVT with handlers for all 256 vectors, then loop: report a step
 * on PORT_SYNC, run the command the host left in the mailbox. Every handler
 * appends a record to the vector log (at LOG, reached through ES) and returns
 * with IRET. Real mode pushes no error codes. All numbers come from
 * pykvm/layout.py as --defsym values.
 */
    .text
entry:
    xor     %ax, %ax
    mov     %ax, %ds
    mov     %ax, %es
    mov     $vector_stubs, %ax          /* IVT entry n = stub n : REAL_MODE_CS */
    mov     $IVT, %di
    mov     $256, %cx
1:  mov     %ax, (%di)
    movw    $REAL_MODE_CS, 2(%di)
    add     $STUB_SIZE, %ax
    add     $4, %di
    loop    1b
    lidt    %cs:ivt_pointer
    mov     $(LOG >> 4), %ax            /* log header: count, capacity */
    mov     %ax, %es
    movl    $0, %es:0
    movl    $LOG_CAPACITY, %es:4
    xor     %ax, %ax
    mov     %ax, %es
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
    mov     %ax, %bx
    shl     $1, %bx
    jmp     *%cs:command_table(%bx)
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
    or      $0x100, %eax
    out     %eax, $PORT_ASSERT
    jmp     next_step
do_raise_0:
    movl    $raise_0_end, MAILBOX+MB_FIXUP
    xor     %dx, %dx
    xor     %cx, %cx
raise_0:
    div     %cx
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

cmd_int:                                /* int $MB_ARG through a table of 4-byte entries */
    movzbw  MAILBOX+MB_ARG, %bx
    shl     $2, %bx
    add     $int_table, %bx
    call    *%bx
    jmp     next_step

cmd_done:
    mov     MAILBOX+MB_STEP, %eax
done_out:
    out     %eax, $PORT_DONE
1:  cli
    hlt
    jmp     1b

/* ---- interrupt handlers ------------------------------------------------- */
    .set    STUB_SIZE, 8

    .altmacro
    .macro  vector_stub n
    .balign STUB_SIZE
    pushw   $0                          /* real mode pushes no error code */
    pushw   $\n
    jmp     handler_common
    .endm

    .balign STUB_SIZE
vector_stubs:
    .set    vector, 0
    .rept   256
    vector_stub %vector
    .set    vector, vector + 1
    .endr

/* Stack: vector, error code, IP, CS, FLAGS (2 bytes each). */
handler_common:
    push    %ds
    push    %es
    pushal
    mov     %sp, %bp
    .set    FRAME, 36                   /* pushal + ES + DS */
    xor     %ax, %ax
    mov     %ax, %ds
    mov     $(LOG >> 4), %ax
    mov     %ax, %es
    mov     %es:0, %ebx                 /* record = header + (count % capacity) * 64 */
    mov     %ebx, %eax
    xor     %edx, %edx
    mov     $LOG_CAPACITY, %ecx
    div     %ecx
    imul    $LOG_RECORD_SIZE, %edx, %edi
    add     $LOG_HEADER_SIZE, %edi
    mov     %ebx, %es:REC_SEQ(%di)
    movzwl  FRAME(%bp), %eax            /* vector */
    mov     %ax, %es:REC_VECTOR(%di)
    mov     FRAME+6(%bp), %cx
    mov     %cx, %es:REC_CS(%di)
    movl    $0, %es:REC_ERROR_CODE(%di)
    movzwl  FRAME+4(%bp), %ecx
    mov     %ecx, %es:REC_RIP(%di)
    movl    $0, %es:REC_RIP+4(%di)
    movzwl  FRAME+8(%bp), %ecx
    mov     %ecx, %es:REC_RFLAGS(%di)
    movl    $0, %es:REC_RFLAGS+4(%di)
    lea     FRAME+10(%bp), %cx          /* SP before the CPU pushed the frame */
    movzwl  %cx, %ecx
    mov     %ecx, %es:REC_RSP(%di)
    movl    $0, %es:REC_RSP+4(%di)
    mov     MAILBOX+MB_CPU, %ecx
    mov     %ecx, %es:REC_CPU(%di)
    movl    $0, %es:REC_CPU+4(%di)
    movl    $0, %es:REC_CR2(%di)
    movl    $0, %es:REC_CR2+4(%di)
    push    %eax
    rdtsc
    mov     %eax, %es:REC_TSC(%di)
    mov     %edx, %es:REC_TSC+4(%di)
    pop     %eax
    xor     %esi, %esi                  /* record flags */
    cmp     $32, %ax
    jae     2f
    mov     MAILBOX+MB_FIXUP, %ecx      /* an expected exception: resume after it */
    test    %ecx, %ecx
    jz      2f
    mov     %cx, FRAME+4(%bp)
    movl    $0, MAILBOX+MB_FIXUP
    or      $REC_FLAG_FIXUP, %esi
2:  mov     %esi, %es:REC_FLAGS(%di)
    inc     %ebx                        /* publish the record */
    mov     %ebx, %es:0
    cmpl    $0, MAILBOX+MB_NOTIFY
    je      3f
handler_notify_out:
    out     %al, $PORT_VECTOR
3:  popal
    pop     %es
    pop     %ds
    add     $4, %sp                     /* vector, error code */
handler_iret:
    iret

    .include "int_table.inc"

    .data
    .balign 2
command_table:
    .word   cmd_nop, cmd_cli, cmd_sti, cmd_sti_nop, cmd_mov_ss, cmd_hlt
    .word   cmd_sti_hlt, cmd_spin, cmd_raise, cmd_int, cmd_done
ivt_pointer:
    .word   256 * 4 - 1
    .long   IVT
