/*
 * pykvm guest image, 64-bit long mode.
 *
 * Entered at `entry` (= CODE) by pykvm.x86.enter_long_mode: paging on with the
 * low 4 GiB identity-mapped, CS = SEL_CODE64, flat data, RSP = STACK_TOP,
 * IF = 0. Labels are linear addresses. All numbers come from pykvm/layout.py
 * (--defsym).
 *
 * 1. init: vector log header, initial APIC ID, IDT of 256 64-bit interrupt
 *    gates (IST 0) pointing at 16-byte stubs, lidt.
 * 2. loop: MB_STEP = step; `out %eax, $PORT_SYNC` (eax = step); run the
 *    command the host left at MB_COMMAND / MB_ARG; step++. The step counter
 *    lives in %r15 (nothing else touches it).
 * 3. every vector: stub -> handler_common, which appends a record to the log,
 *    optionally `out`s the vector to PORT_VECTOR, resumes an expected
 *    exception at MB_FIXUP and returns with IRETQ.
 *
 * Sizes: vector stubs 16 bytes (stub n at vector_stubs + 16*n); int_table
 * entries 4 bytes (`int $n` at int_table + 4*n).
 */
    .set    BITS, 64
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

    mov     $vector_stubs, %eax         /* IDT: 256 16-byte interrupt gates */
    mov     $IDT, %edi
    mov     $256, %ecx
1:  mov     %ax, (%rdi)                 /* offset 15:0 */
    movw    $SEL_CODE64, 2(%rdi)        /* selector */
    movw    $0x8E00, 4(%rdi)            /* IST 0; P=1, DPL 0, type 0xE */
    mov     %eax, %edx
    shr     $16, %edx
    mov     %dx, 6(%rdi)                /* offset 31:16 */
    movq    $0, 8(%rdi)                 /* offset 63:32 = 0, reserved */
    add     $STUB_SIZE, %eax
    add     $16, %rdi
    dec     %ecx
    jnz     1b
    lidt    idt_descriptor

    xor     %r15d, %r15d                /* step = 0 */
main_loop:
    mov     %r15d, MAILBOX+MB_STEP
    mov     %r15d, %eax
sync_out:
    out     %eax, $PORT_SYNC
sync_done:
    mov     MAILBOX+MB_COMMAND, %eax    /* zero-extends into %rax */
    cmp     $CMD_DONE, %eax
    ja      bad_command
    jmp     *command_table(,%rax,8)
next_step:
    inc     %r15d
    jmp     main_loop

bad_command:                            /* not a Command: assert 0x200 | command */
    or      $0x200, %eax
    out     %eax, $PORT_ASSERT
    jmp     next_step

    simple_commands

/* RAISE: fault at raise_<n> and resume at raise_<n>_end through MB_FIXUP. */
cmd_raise:
    mov     MAILBOX+MB_ARG, %rax
    cmp     $0, %rax
    je      do_raise_0
    cmp     $3, %rax
    je      do_raise_3
    cmp     $6, %rax
    je      do_raise_6
    cmp     $13, %rax
    je      do_raise_13
    cmp     $14, %rax
    je      do_raise_14
    or      $0x100, %eax                /* not raisable here: assert 0x100 | n */
    out     %eax, $PORT_ASSERT
    jmp     next_step

do_raise_0:                             /* #DE: divide by zero */
    set_fixup raise_0_end
    xor     %edx, %edx
    xor     %ecx, %ecx
raise_0:
    div     %ecx
raise_0_end:
    jmp     next_step

do_raise_3:                             /* #BP: a trap, returns past the int3 itself */
raise_3:
    int3
raise_3_end:
    jmp     next_step

do_raise_6:                             /* #UD */
    set_fixup raise_6_end
raise_6:
    ud2
raise_6_end:
    jmp     next_step

do_raise_13:                            /* #GP(0x1234): selector beyond the GDT limit */
    set_fixup raise_13_end
    mov     $0x1234, %eax
raise_13:
    mov     %eax, %ds
raise_13_end:
    jmp     next_step

do_raise_14:                            /* #PF: read above the 4 GiB identity map */
    set_fixup raise_14_end
    movabs  $0x123456000, %rax
raise_14:
    movb    (%rax), %al
raise_14_end:
    jmp     next_step

/* INT: `int $MB_ARG` (low byte) through int_table. */
cmd_int:
    movzbl  MAILBOX+MB_ARG, %eax
    lea     int_table(,%rax,INT_ENTRY_SIZE), %rax
    call    *%rax
int_done:
    jmp     next_step

cmd_done:
    mov     %r15d, %eax
done_out:
    out     %eax, $PORT_DONE
1:  cli
    hlt
    jmp     1b

    int_table_entries

/* ---- interrupt and exception handlers ---------------------------------------- */
    vector_stub_table STUB_SIZE, 1

/*
 * On entry: (%rsp) = vector [| STUB_ERROR_CODE], 8 = error code (CPU's or the
 * stub's dummy), 16 = RIP, 24 = CS, 32 = RFLAGS, 40 = RSP, 48 = SS.
 */
handler_common:
    testl   $STUB_ERROR_CODE, (%rsp)
    jz      frame_ready
    /* The stub expected a CPU error code. Software `int n` and injected
     * external interrupts push none: then the slot after it holds CS (not
     * RIP) and the one after that RFLAGS (bit 1 always set; a CS selector of
     * RPL 0 has it clear). Insert a dummy so the frame is uniform. */
    push    %rax
    mov     %cs, %eax
    cmp     %ax, 24(%rsp)
    jne     1f
    testb   $2, 32(%rsp)
    jz      1f
    pop     %rax
    pushq   (%rsp)                      /* vector again, one slot lower */
    movq    $0, 8(%rsp)                 /* dummy error code */
    andq    $0xFF, (%rsp)               /* untag: no CPU error code */
    jmp     frame_ready
1:  pop     %rax
frame_ready:
    push    %rax
    push    %rbx
    push    %rcx
    push    %rdx
    push    %rsi
    push    %rdi
    .set    FRAME, 6 * 8                /* the pushes above */

    mov     LOG, %ebx                   /* ebx = count */
    mov     %ebx, %eax                  /* rdi = LOG + header + (count % capacity) * size */
    xor     %edx, %edx
    mov     $LOG_CAPACITY, %ecx
    div     %ecx
    imul    $LOG_RECORD_SIZE, %edx, %edi
    add     $(LOG + LOG_HEADER_SIZE), %edi

    mov     %ebx, REC_SEQ(%rdi)
    movzbl  FRAME(%rsp), %eax
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
    mov     %ecx, REC_CPU(%rdi)
    movl    $0, REC_CPU+4(%rdi)         /* rest of the record */
    rdtsc
    shl     $32, %rdx
    or      %rdx, %rax
    mov     %rax, REC_TSC(%rdi)
    movq    $0, REC_CR2(%rdi)

    xor     %esi, %esi                  /* esi = record flags */
    movzwl  FRAME(%rsp), %eax           /* vector | STUB_ERROR_CODE */
    test    $STUB_ERROR_CODE, %eax
    jz      1f
    or      $REC_FLAG_ERROR_CODE, %esi
    cmp     $(14 | STUB_ERROR_CODE), %eax
    jne     1f
    mov     %cr2, %rcx                  /* a real page fault */
    mov     %rcx, REC_CR2(%rdi)
    or      $REC_FLAG_CR2, %esi
1:  movzbl  %al, %eax                   /* eax = vector */
    cmp     $32, %eax
    jae     2f
    mov     MAILBOX+MB_FIXUP, %rcx      /* an expected exception: resume there */
    test    %rcx, %rcx
    jz      2f
    mov     %rcx, FRAME+16(%rsp)
    movq    $0, MAILBOX+MB_FIXUP
    or      $REC_FLAG_FIXUP, %esi
2:  mov     %esi, REC_FLAGS(%rdi)
    inc     %ebx                        /* publish the complete record */
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

    .section .rodata
    .balign 8
command_table:                          /* indexed by Command */
    .quad   cmd_nop, cmd_cli, cmd_sti, cmd_sti_nop, cmd_mov_ss, cmd_hlt
    .quad   cmd_sti_hlt, cmd_spin, cmd_raise, cmd_int, cmd_done
command_table_end:
    .if     (command_table_end - command_table) <> 8 * (CMD_DONE + 1)
    .error  "command_table does not match pykvm.layout.Command"
    .endif
    .balign 8
idt_descriptor:
    .word   256 * 16 - 1
    .quad   IDT
