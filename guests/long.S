/*
 * pykvm guest image, 64-bit long mode.
 *
 * The host (pykvm.x86.enter_long_mode) starts us at `entry` with paging on,
 * flat segments, RSP = STACK_TOP and IF = 0. We install an IDT with handlers
 * for all 256 vectors, then loop: report a step on PORT_SYNC, run the command
 * the host left in the mailbox. Every handler appends a record to the vector
 * log (pykvm.layout) and returns with IRETQ. All numbers come from
 * pykvm/layout.py as --defsym values.
 */
    .text
entry:
    mov     $vector_stubs, %eax         /* IDT: 16-byte interrupt gates */
    mov     $IDT, %edi
    xor     %ecx, %ecx
1:  mov     %ax, (%rdi)                 /* offset 15:0 */
    movw    $SEL_CODE64, 2(%rdi)
    movw    $0x8E00, 4(%rdi)            /* present, DPL 0, 64-bit interrupt gate, IST 0 */
    mov     %eax, %edx
    shr     $16, %edx
    mov     %dx, 6(%rdi)                /* offset 31:16 */
    movq    $0, 8(%rdi)                 /* offset 63:32 (0), reserved */
    add     $STUB_SIZE, %eax
    add     $16, %edi
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
    xor     %r15d, %r15d                /* r15: step counter */

main_loop:
    mov     %r15d, MAILBOX+MB_STEP
    mov     %r15d, %eax
sync_out:
    out     %eax, $PORT_SYNC
sync_done:
    mov     MAILBOX+MB_COMMAND, %eax
    cmp     $CMD_DONE, %eax
    ja      bad_command
    jmp     *command_table(,%rax,8)
next_step:
    inc     %r15d
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
    cmp     $14, %eax
    je      do_raise_14
    or      $0x100, %eax
    out     %eax, $PORT_ASSERT
    jmp     next_step
do_raise_0:
    movq    $raise_0_end, MAILBOX+MB_FIXUP
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
    movq    $raise_6_end, MAILBOX+MB_FIXUP
raise_6:
    ud2
raise_6_end:
    jmp     next_step
do_raise_13:
    movq    $raise_13_end, MAILBOX+MB_FIXUP
    mov     $0x1234, %ax                /* beyond the GDT limit: #GP(0x1234) */
raise_13:
    mov     %ax, %ds
raise_13_end:
    jmp     next_step
do_raise_14:
    movq    $raise_14_end, MAILBOX+MB_FIXUP
    movabs  $0x123456000, %rax          /* above the 4 GiB identity map: #PF */
raise_14:
    mov     (%rax), %al
raise_14_end:
    jmp     next_step

cmd_int:                                /* int $MB_ARG through a table of 4-byte entries */
    movzbl  MAILBOX+MB_ARG, %eax
    lea     int_table(,%rax,4), %rax
    call    *%rax
    jmp     next_step

cmd_done:
    mov     %r15d, %eax
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
    pushq   $0                          /* dummy error code */
    .endif
    pushq   $\n
    jmp     handler_common
    .endm

    .balign STUB_SIZE
vector_stubs:
    .set    vector, 0
    .rept   256
    vector_stub %vector
    .set    vector, vector + 1
    .endr

/* Stack: vector, error code, RIP, CS, RFLAGS, RSP, SS (8 bytes each). */
handler_common:
    push    %rax
    push    %rbx
    push    %rcx
    push    %rdx
    push    %rsi
    push    %rdi
    .set    FRAME, 48                   /* the six pushes above */
    mov     LOG, %ebx                   /* record = LOG + header + (count % capacity) * 64 */
    mov     %ebx, %eax
    xor     %edx, %edx
    mov     $LOG_CAPACITY, %ecx
    div     %ecx
    imul    $LOG_RECORD_SIZE, %edx, %edi
    add     $(LOG + LOG_HEADER_SIZE), %edi
    mov     %ebx, REC_SEQ(%rdi)
    mov     FRAME(%rsp), %rax           /* vector */
    mov     %ax, REC_VECTOR(%rdi)
    mov     FRAME+24(%rsp), %rcx
    mov     %cx, REC_CS(%rdi)
    mov     FRAME+8(%rsp), %rcx
    mov     %ecx, REC_ERROR_CODE(%rdi)
    mov     FRAME+16(%rsp), %rcx
    mov     %rcx, REC_RIP(%rdi)
    mov     FRAME+32(%rsp), %rcx
    mov     %rcx, REC_RFLAGS(%rdi)
    mov     FRAME+40(%rsp), %rcx
    mov     %rcx, REC_RSP(%rdi)
    mov     MAILBOX+MB_CPU, %ecx
    mov     %rcx, REC_CPU(%rdi)
    rdtsc
    shl     $32, %rdx
    or      %rdx, %rax
    mov     %rax, REC_TSC(%rdi)
    movq    $0, REC_CR2(%rdi)
    xor     %esi, %esi                  /* record flags */
    mov     FRAME(%rsp), %rax
    cmp     $32, %eax
    jae     2f
    mov     $ERROR_CODE_MASK, %ecx
    bt      %eax, %ecx
    jnc     1f
    or      $REC_FLAG_ERROR_CODE, %esi
1:  cmp     $14, %eax
    jne     1f
    mov     %cr2, %rcx
    mov     %rcx, REC_CR2(%rdi)
    or      $REC_FLAG_CR2, %esi
1:  mov     MAILBOX+MB_FIXUP, %rcx      /* an expected exception: resume after it */
    test    %rcx, %rcx
    jz      2f
    mov     %rcx, FRAME+16(%rsp)
    movq    $0, MAILBOX+MB_FIXUP
    or      $REC_FLAG_FIXUP, %esi
2:  mov     %esi, REC_FLAGS(%rdi)
    inc     %ebx                        /* publish the record */
    mov     %ebx, LOG
    cmpl    $0, MAILBOX+MB_NOTIFY
    je      3f
handler_notify_out:
    out     %al, $PORT_VECTOR
3:  pop     %rdi
    pop     %rsi
    pop     %rdx
    pop     %rcx
    pop     %rbx
    pop     %rax
    add     $16, %rsp                   /* vector, error code */
handler_iret:
    iretq

    .include "int_table.inc"

    .data
    .balign 8
command_table:
    .quad   cmd_nop, cmd_cli, cmd_sti, cmd_sti_nop, cmd_mov_ss, cmd_hlt
    .quad   cmd_sti_hlt, cmd_spin, cmd_raise, cmd_int, cmd_done
idt_pointer:
    .word   256 * 16 - 1
    .quad   IDT
