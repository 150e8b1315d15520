/*
 * pykvm guest image, 64-bit long mode.
 *
 * Entered at `entry` (= CODE) by pykvm.x86.enter_long_mode: paging on with the
 * low 4 GiB identity-mapped, CS = SEL_CODE64, flat data, IF = 0. SMP-aware:
 * every vCPU runs this same code with its own area (pykvm.guests.layout.cpu_area),
 * which the host passes in registers: %r14 = this CPU's mailbox (its MB_LOG
 * holds this CPU's vector log), RSP = its stack top. Nothing changes %r14, so
 * handlers rely on it too. Labels are linear addresses. All numbers come
 * from pykvm/guests/layout.py (--defsym).
 *
 * 1. init: vector log header, initial APIC ID, IDT of 256 64-bit interrupt
 *    gates (IST 0) pointing at 16-byte stubs, lidt. (Every CPU writes the
 *    same IDT; the bytes do not change.)
 * 2. loop: MB_STEP = step; `out %eax, $PORT_SYNC` (eax = step); run the
 *    command the host left at MB_COMMAND / MB_ARG (loaded into %rcx) /
 *    MB_ARG2; step++. The step counter lives in %r15 (nothing else touches it).
 *    APIC commands go through apic_write / apic_read, which use xAPIC MMIO
 *    or x2APIC MSRs as MB_APIC_MODE says.
 * 3. every vector: stub (saves RAX, RDX; rdtsc) -> handler_common, which
 *    appends a record to the log (its TSC is the stub's),
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
    mov     MB_LOG(%r14), %rdi          /* log header: count = 0, capacity */
    movl    $0, (%rdi)
    movl    $LOG_CAPACITY, 4(%rdi)
    mov     $1, %eax                    /* initial APIC ID: CPUID.1:EBX[31:24] */
    cpuid
    shr     $24, %ebx
    mov     %ebx, MB_CPU(%r14)

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
    mov     %r15d, MB_STEP(%r14)
    mov     %r15d, %eax
sync_out:
    out     %eax, $PORT_SYNC
sync_done:
    mov     MB_COMMAND(%r14), %eax      /* zero-extends into %rax */
    cmp     $CMD_DONE, %eax
    ja      bad_command
    mov     MB_ARG(%r14), %rcx
    jmp     *command_table(,%rax,8)
next_step:
    inc     %r15d
    jmp     main_loop

    simple_commands


    raise_commands

do_raise_14:                            /* #PF: read above the 4 GiB identity map */
    set_fixup raise_14_end
    movabs  $0x123456000, %rax
raise_14:
    movb    (%rax), %al
raise_14_end:
    jmp     next_step

/* INT: `int $MB_ARG` (low byte) through int_table. */
cmd_int:
    movzbl  %cl, %eax
    lea     int_table(,%rax,INT_ENTRY_SIZE), %rax
    call    *%rax
int_done:
    jmp     next_step

/* ---- APIC, IOAPIC, MSRs ------------------------------------------------------ */

/* APIC_ENABLE: APIC base MSR EN (%rcx bit 0: then EXTD too), SVR = enabled, spurious 0xFF. */
cmd_apic_enable:
    mov     %rcx, %rsi
    mov     $APIC_BASE_MSR, %ecx
    rdmsr
    or      $0x800, %eax                /* EN: xAPIC (x2APIC is entered only from xAPIC) */
    wrmsr
    movl    $1, MB_APIC_MODE(%r14)
    test    $1, %esi
    jz      1f
    or      $0x400, %eax                /* EXTD: x2APIC */
    wrmsr
    movl    $2, MB_APIC_MODE(%r14)
1:  mov     $0xF0, %edx                 /* SVR */
    mov     $0x1FF, %eax
    call    apic_write
    jmp     next_step

cmd_apic_write:
    mov     MB_ARG2(%r14), %edx
    mov     %rcx, %rax
    call    apic_write
    jmp     next_step

cmd_apic_read:
    mov     MB_ARG2(%r14), %edx
    call    apic_read
    mov     %rax, MB_RESULT(%r14)
    jmp     next_step

cmd_ioapic_write:                       /* IOREGSEL = MB_ARG2, IOWIN = MB_ARG */
    mov     $IOAPIC_BASE, %esi
    mov     MB_ARG2(%r14), %eax
    mov     %eax, (%rsi)
    mov     %ecx, 0x10(%rsi)
    jmp     next_step

/* WRMSR: MSR MB_ARG2 = MB_ARG. A #GP (no such MSR, a refused value) is logged and resumed
 * at wrmsr_end, where the host finds it in the log (GuestSession.command names it). */
cmd_wrmsr:
    mov     %rcx, %rax
    mov     %rcx, %rdx
    shr     $32, %rdx
    mov     MB_ARG2(%r14), %ecx
    set_fixup wrmsr_end
wrmsr_wrmsr:
    wrmsr
    movq    $0, MB_FIXUP(%r14)          /* no #GP: nothing used the fixup */
wrmsr_end:
    jmp     next_step

cmd_tsc_deadline:                       /* IA32_TSC_DEADLINE = now + %rcx */
    rdtsc
    shl     $32, %rdx
    or      %rdx, %rax
    add     %rcx, %rax
    mov     %rax, %rdx
    shr     $32, %rdx
    mov     $TSC_DEADLINE_MSR, %ecx
    wrmsr
    jmp     next_step

/* WAIT_LOG: halt with interrupts on until this CPU's log holds %ecx records.
 * `sti; hlt` keeps the hlt in the STI shadow where the host honours it; where
 * it does not, handler_common resumes an interrupt taken at the hlt past it.
 * Returns with IF=0. */
cmd_wait_log:
    mov     MB_LOG(%r14), %rsi
1:  cli
    cmp     %ecx, (%rsi)
    jae     2f
wait_log_sti:
    sti
wait_log_hlt:
    hlt
    jmp     1b
2:  jmp     next_step

/* apic_write: LAPIC register at xAPIC offset %edx = %rax (the ICR takes all 64 bits).
 * Clobbers rax, rcx, rdx, rsi. */
apic_write:
    cmpl    $2, MB_APIC_MODE(%r14)
    je      2f
    mov     $XAPIC_BASE, %esi
    cmp     $0x300, %edx                /* ICR: high half first, the low write sends */
    jne     1f
    mov     %rax, %rcx
    shr     $32, %rcx
    mov     %ecx, 0x310(%rsi)
1:  mov     %eax, (%rsi,%rdx)
    ret
2:  mov     %edx, %ecx                  /* x2APIC: MSR 0x800 + offset / 16 */
    shr     $4, %ecx
    add     $0x800, %ecx
    mov     %rax, %rdx
    shr     $32, %rdx
    wrmsr
    ret

/* apic_read: %rax = LAPIC register at xAPIC offset %edx. Clobbers rcx, rdx, rsi. */
apic_read:
    cmpl    $2, MB_APIC_MODE(%r14)
    je      2f
    mov     $XAPIC_BASE, %esi
    mov     (%rsi,%rdx), %eax
    cmp     $0x300, %edx
    jne     1f
    mov     0x310(%rsi), %ecx
    shl     $32, %rcx
    or      %rcx, %rax
1:  ret
2:  mov     %edx, %ecx
    shr     $4, %ecx
    add     $0x800, %ecx
    rdmsr
    shl     $32, %rdx
    or      %rdx, %rax
    ret

    done_command

    int_table_entries

/* ---- interrupt and exception handlers ---------------------------------------- */
    vector_stub_table STUB_SIZE, 1

/*
 * On entry: edx:eax = the TSC the stub read (two pushes after the delivery);
 * (%rsp) = vector [| STUB_ERROR_CODE], 8 = interrupted RDX, 16 = interrupted
 * RAX, 24 = the CPU's error code if it pushed one, else RIP.
 */
handler_common:
    shl     $32, %rdx
    or      %rdx, %rax                  /* rax = TSC at delivery; rdx is free */
    testl   $STUB_ERROR_CODE, (%rsp)
    jz      insert_error_code
    /* The stub expected a CPU error code. Software `int n` and injected
     * external interrupts push none: then the slot after the saved RAX holds
     * RIP, the next CS and the next RFLAGS (bit 1 always set; a CS selector
     * of RPL 0 has it clear). */
    mov     %cs, %edx
    cmp     %dx, 32(%rsp)
    jne     frame_ready
    testb   $2, 40(%rsp)
    jz      frame_ready
    andq    $0xFF, (%rsp)               /* untag: no CPU error code */
insert_error_code:                      /* a dummy 0 below the CPU's frame: move the */
    sub     $8, %rsp                    /* stub's three slots down by one */
    mov     8(%rsp), %rdx
    mov     %rdx, (%rsp)
    mov     16(%rsp), %rdx
    mov     %rdx, 8(%rsp)
    mov     24(%rsp), %rdx
    mov     %rdx, 16(%rsp)
    movq    $0, 24(%rsp)
frame_ready:
    push    %rax                        /* the TSC */
    push    %rbx
    push    %rcx
    push    %rsi
    push    %rdi
    push    %r8
    .set    FRAME, 6 * 8                /* the pushes above; then the uniform frame: */
    .set    FRAME_TSC, 5 * 8
    .set    F_RDX, FRAME + 8            /* (FRAME = vector) interrupted RDX, */
    .set    F_RAX, FRAME + 16           /* interrupted RAX, */
    .set    F_ERROR, FRAME + 24         /* error code (the CPU's or a dummy), */
    .set    F_RIP, FRAME + 32           /* then the CPU's RIP, CS, RFLAGS, RSP, SS */
    .set    F_CS, FRAME + 40
    .set    F_RFLAGS, FRAME + 48
    .set    F_RSP, FRAME + 56

    mov     MB_LOG(%r14), %r8           /* r8 = this CPU's log */
    mov     (%r8), %ebx                 /* ebx = count */
    mov     %ebx, %eax                  /* rdi = log + header + (count % capacity) * size */
    xor     %edx, %edx
    mov     $LOG_CAPACITY, %ecx
    div     %ecx
    imul    $LOG_RECORD_SIZE, %edx, %edi
    lea     LOG_HEADER_SIZE(%r8,%rdi), %rdi

    mov     %ebx, REC_SEQ(%rdi)
    movzbl  FRAME(%rsp), %eax
    mov     %ax, REC_VECTOR(%rdi)
    mov     F_CS(%rsp), %rcx
    mov     %cx, REC_CS(%rdi)
    mov     F_ERROR(%rsp), %rcx
    mov     %ecx, REC_ERROR_CODE(%rdi)
    mov     F_RIP(%rsp), %rcx
    mov     %rcx, REC_RIP(%rdi)
    mov     F_RFLAGS(%rsp), %rcx
    mov     %rcx, REC_RFLAGS(%rdi)
    mov     F_RSP(%rsp), %rcx
    mov     %rcx, REC_RSP(%rdi)
    mov     MB_CPU(%r14), %ecx
    mov     %ecx, REC_CPU(%rdi)
    movl    $0, REC_CPU+4(%rdi)         /* rest of the record */
    mov     FRAME_TSC(%rsp), %rcx       /* the stub's TSC */
    mov     %rcx, REC_TSC(%rdi)
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
    mov     MB_FIXUP(%r14), %rcx        /* an expected exception: resume there */
    test    %rcx, %rcx
    jz      2f
    mov     %rcx, F_RIP(%rsp)
    movq    $0, MB_FIXUP(%r14)
    or      $REC_FLAG_FIXUP, %esi
2:  mov     %esi, REC_FLAGS(%rdi)
    inc     %ebx                        /* publish the complete record */
    mov     %ebx, (%r8)

    /* Taken before WAIT_LOG's hlt (inside the STI shadow: a host that lost the
     * shadow across an exit there, as kvm_amd under QEMU 7.2's TCG does), the
     * interrupt returns past the hlt, so the loop looks at the log again
     * instead of halting with nothing left to wake it. The record keeps the
     * RIP it interrupted. */
    lea     wait_log_hlt(%rip), %rcx
    cmp     %rcx, F_RIP(%rsp)
    jne     5f
    incq    F_RIP(%rsp)                 /* hlt is one byte */
5:

    cmpl    $1, MB_AUTO_EOI(%r14)       /* LAPIC EOI for interrupts (not exceptions, */
    jne     4f                          /* not the spurious vector 0xFF) */
    cmp     $32, %eax
    jb      4f
    cmp     $0xFF, %eax
    je      4f
    push    %rax
    mov     $0xB0, %edx                 /* EOI */
    xor     %eax, %eax
    call    apic_write
    pop     %rax
4:  cmpl    $0, MB_NOTIFY(%r14)
    je      3f
handler_notify_out:
    out     %al, $PORT_VECTOR
3:  pop     %r8
    pop     %rdi
    pop     %rsi
    pop     %rcx
    pop     %rbx
    add     $8, %rsp                    /* the TSC */
    mov     8(%rsp), %rdx
    mov     16(%rsp), %rax
    add     $32, %rsp                   /* vector, RDX, RAX, error code */
handler_iret:
    iretq

    .section .rodata
    .balign 8
command_table:                          /* indexed by Command */
    .quad   cmd_nop, cmd_cli, cmd_sti, cmd_sti_nop, cmd_mov_ss, cmd_hlt
    .quad   cmd_sti_hlt, cmd_spin, cmd_raise, cmd_int
    .quad   cmd_apic_enable, cmd_apic_write, cmd_apic_read, cmd_ioapic_write
    .quad   cmd_wrmsr, cmd_tsc_deadline, cmd_wait_log, cmd_pic_init, cmd_done
command_table_end:
    .if     (command_table_end - command_table) <> 8 * (CMD_DONE + 1)
    .error  "command_table does not match pykvm.guests.protocol.Command"
    .endif
    .balign 8
idt_descriptor:
    .word   256 * 16 - 1
    .quad   IDT
