/*
 * pykvm guest image, 16-bit real mode.
 *
 * Entered at REAL_MODE_CS:0 by pykvm.x86.enter_real_mode (CS base = CODE),
 * DS = ES = FS = GS = SS = 0, SP = STACK_TOP, IF = 0. Labels are IP offsets
 * in CS. The mailbox is reached through DS = 0, the vector log through
 * ES = LOG >> 4 (header and all records fit in that one 64 KiB segment).
 * All numbers come from pykvm/guests/layout.py (--defsym).
 *
 * 1. init: vector log header, initial APIC ID, IVT (entry n = stub n :
 *    REAL_MODE_CS) for all 256 vectors, lidt.
 * 2. loop: MB_STEP = step; `out %eax, $PORT_SYNC` (eax = step); run the
 *    command the host left at MB_COMMAND / MB_ARG; step++. The step counter
 *    lives in %ebp (no command touches it; handlers preserve it).
 * 3. every vector: stub (saves EAX, EDX; rdtsc) -> handler_common, which
 *    appends a record to the log (its TSC is the stub's), optionally `out`s
 *    the vector to PORT_VECTOR, resumes an expected exception at MB_FIXUP and
 *    returns with IRET. Real mode never pushes an error code (the record's is 0).
 *
 * Sizes: vector stubs 16 bytes (stub n at vector_stubs + 16*n); int_table
 * entries 4 bytes (`int $n` at int_table + 4*n).
 */
    .set    BITS, 16
    .include "common.inc"
    .set    STUB_SIZE, 16
    .set    LOG_SEG, LOG >> 4           /* ES value that reaches the log */
    .set    LOG_OFF, LOG & 0xF          /* offset of the log header in that segment */

    .if     LOG_OFF + LOG_HEADER_SIZE + LOG_CAPACITY * LOG_RECORD_SIZE > 0x10000
    .error  "the vector log does not fit in one real-mode segment"
    .endif

    .text
entry:
    xor     %ax, %ax
    mov     %ax, %ds                    /* DS = 0: mailbox, IVT */
    mov     $LOG_SEG, %ax
    mov     %ax, %es
    movl    $0, %es:LOG_OFF             /* log header: count = 0, capacity */
    movl    $LOG_CAPACITY, %es:LOG_OFF+4
    xor     %ax, %ax
    mov     %ax, %es
    mov     $1, %eax                    /* initial APIC ID: CPUID.1:EBX[31:24] */
    cpuid
    shr     $24, %ebx
    mov     %ebx, MAILBOX+MB_CPU

    mov     $vector_stubs, %ax          /* IVT: entry n = stub n : REAL_MODE_CS */
    mov     $IVT, %di
    mov     $256, %cx
1:  mov     %ax, (%di)
    movw    $REAL_MODE_CS, 2(%di)
    add     $STUB_SIZE, %ax
    add     $4, %di
    dec     %cx
    jnz     1b
    lidt    %cs:idt_descriptor

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
    mov     %ax, %bx
    add     %bx, %bx
    mov     MAILBOX+MB_ARG, %ecx
    jmp     *%cs:command_table(%bx)
next_step:
    inc     %ebp
    jmp     main_loop

    simple_commands


    raise_commands

/* INT: `int $MB_ARG` (low byte) through int_table. */
cmd_int:
    movzbw  MAILBOX+MB_ARG, %bx
    shl     $2, %bx                     /* INT_ENTRY_SIZE */
    add     $int_table, %bx
    call    *%bx
int_done:
    jmp     next_step

    done_command

    int_table_entries

/* ---- interrupt and exception handlers ---------------------------------------- */
    vector_stub_table STUB_SIZE, 0

/*
 * On entry (SS = 0): edx:eax = the TSC the stub read (two pushes after the
 * delivery); (%sp) = vector, 2 = interrupted EDX, 6 = interrupted EAX,
 * 10 = IP, 12 = CS, 14 = FLAGS; the interrupted SP is just above FLAGS.
 */
handler_common:
    push    %ds
    push    %es
    pushal                              /* its EAX and EDX slots hold the TSC */
    mov     %sp, %bp
    .set    FRAME, 2 + 2 + 8 * 4        /* DS, ES, pushal; then the frame: */
    .set    FRAME_TSC_LO, 7 * 4         /* pushal's EAX */
    .set    FRAME_TSC_HI, 5 * 4         /* pushal's EDX */
    .set    F_IP, FRAME + 10            /* (FRAME = vector, +2 EDX, +6 EAX) the CPU's IP, */
    .set    F_CS, FRAME + 12            /* CS, FLAGS */
    .set    F_FLAGS, FRAME + 14
    .set    F_SP, FRAME + 16            /* where the interrupted SP pointed */
    xor     %ax, %ax
    mov     %ax, %ds                    /* DS = 0: mailbox */
    mov     $LOG_SEG, %ax
    mov     %ax, %es                    /* ES: vector log */

    mov     %es:LOG_OFF, %ebx           /* ebx = count */
    mov     %ebx, %eax                  /* di = LOG_OFF + header + (count % capacity) * size */
    xor     %edx, %edx
    mov     $LOG_CAPACITY, %ecx
    div     %ecx
    imul    $LOG_RECORD_SIZE, %edx, %edi
    add     $(LOG_OFF + LOG_HEADER_SIZE), %edi

    mov     %ebx, %es:REC_SEQ(%di)
    movzbl  FRAME(%bp), %eax
    mov     %ax, %es:REC_VECTOR(%di)
    mov     F_CS(%bp), %cx
    mov     %cx, %es:REC_CS(%di)
    movl    $0, %es:REC_ERROR_CODE(%di)
    movzwl  F_IP(%bp), %ecx
    mov     %ecx, %es:REC_RIP(%di)
    movl    $0, %es:REC_RIP+4(%di)
    movzwl  F_FLAGS(%bp), %ecx
    mov     %ecx, %es:REC_RFLAGS(%di)
    movl    $0, %es:REC_RFLAGS+4(%di)
    lea     F_SP(%bp), %cx              /* SP before the CPU pushed its frame */
    movzwl  %cx, %ecx
    mov     %ecx, %es:REC_RSP(%di)
    movl    $0, %es:REC_RSP+4(%di)
    mov     MAILBOX+MB_CPU, %ecx
    mov     %ecx, %es:REC_CPU(%di)
    movl    $0, %es:REC_CPU+4(%di)      /* rest of the record */
    mov     FRAME_TSC_LO(%bp), %ecx     /* the stub's TSC */
    mov     %ecx, %es:REC_TSC(%di)
    mov     FRAME_TSC_HI(%bp), %ecx
    mov     %ecx, %es:REC_TSC+4(%di)
    movl    $0, %es:REC_CR2(%di)        /* no page faults in real mode */
    movl    $0, %es:REC_CR2+4(%di)

    xor     %esi, %esi                  /* esi = record flags */
    movzbl  FRAME(%bp), %eax            /* eax = vector */
    cmp     $32, %ax
    jae     2f
    mov     MAILBOX+MB_FIXUP, %ecx      /* an expected exception: resume there */
    or      MAILBOX+MB_FIXUP+4, %ecx
    jz      2f
    mov     MAILBOX+MB_FIXUP, %cx
    mov     %cx, F_IP(%bp)
    movl    $0, MAILBOX+MB_FIXUP
    movl    $0, MAILBOX+MB_FIXUP+4
    or      $REC_FLAG_FIXUP, %esi
2:  mov     %esi, %es:REC_FLAGS(%di)
    inc     %ebx                        /* publish the complete record */
    mov     %ebx, %es:LOG_OFF

    cmpl    $2, MAILBOX+MB_AUTO_EOI     /* 8259 EOI: slave too if it came from there */
    jne     4f
    mov     %al, %dl
    mov     $0x20, %al                  /* OCW2: non-specific EOI */
    sub     MAILBOX+MB_PIC_BASES+1, %dl
    cmp     $8, %dl
    jae     5f
    out     %al, $0xA0
5:  out     %al, $0x20
    movzbl  FRAME(%bp), %eax            /* eax = vector again */
4:

    cmpl    $0, MAILBOX+MB_NOTIFY
    je      3f
handler_notify_out:
    out     %al, $PORT_VECTOR
3:  popal
    pop     %es
    pop     %ds
    add     $2, %sp                     /* vector */
    pop     %edx
    pop     %eax
handler_iret:
    iret

    .section .rodata
    .balign 2
command_table:                          /* indexed by Command; IP offsets */
    .word   cmd_nop, cmd_cli, cmd_sti, cmd_sti_nop, cmd_mov_ss, cmd_hlt
    .word   cmd_sti_hlt, cmd_spin, cmd_raise, cmd_int
    .word   cmd_unsupported, cmd_unsupported, cmd_unsupported, cmd_unsupported  /* APIC_*, IOAPIC_WRITE */
    .word   cmd_unsupported, cmd_unsupported, cmd_unsupported                  /* WRMSR, TSC_DEADLINE, WAIT_LOG */
    .word   cmd_pic_init, cmd_done
command_table_end:
    .if     (command_table_end - command_table) <> 2 * (CMD_DONE + 1)
    .error  "command_table does not match pykvm.guests.protocol.Command"
    .endif
    .balign 2
idt_descriptor:
    .word   256 * 4 - 1
    .long   IVT
