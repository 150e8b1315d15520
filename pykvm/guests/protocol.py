"""The command protocol between the host and the pykvm guest images: mailbox, ports, commands.

Why this exists: a guest image waits at a sync point for a command; the host
writes it into the mailbox and resumes the vCPU; the guest reports back with
``out`` to a few ports (never with software interrupts, which some hosts cannot
emulate). The host side (:mod:`pykvm.guests.session`) and the assembly agree on
these numbers through :func:`pykvm.guests.layout.asm_defines`.
"""

from __future__ import annotations

import enum

# --- mailbox ---------------------------------------------------------------
MB_COMMAND = 0x00       # u32 Command, written by the host
MB_ARG = 0x08           # u64 argument of the command
MB_STEP = 0x10          # u32 step number the guest reported last
MB_NOTIFY = 0x14        # u32 nonzero: handlers also `out` their vector to PORT_VECTOR
MB_FIXUP = 0x18         # u64 guest-internal: resume address for an expected exception
MB_CPU = 0x20           # u32 guest-internal: initial APIC ID read at boot
MB_ARG2 = 0x28          # u64 second argument (register offset, MSR index, IOAPIC index)
MB_RESULT = 0x30        # u64 result of APIC_READ
MB_LOG = 0x38           # u64 long mode: this CPU's vector log (written by the host)
MB_APIC_MODE = 0x40     # u32 guest-internal: 0 APIC untouched, 1 xAPIC, 2 x2APIC
MB_AUTO_EOI = 0x44      # u32 handlers EOI vectors >= 32: 0 no, 1 LAPIC (long), 2 8259 PIC (real)
MB_PIC_BASES = 0x48     # u16 8259 vector bases: master (low byte), slave (high byte)
MAILBOX_SIZE = 0x100

# --- ports (guest -> host, always with `out`) --------------------------------
PORT_SYNC = 0xE0        # out %eax: "reached step N"; the host answers through the mailbox
PORT_VECTOR = 0xE1      # out %al: a handler logged this vector (when MB_NOTIFY is set)
PORT_DONE = 0xE2        # out %eax: the guest finished (Command.DONE)
PORT_ASSERT = 0xE3      # out %eax: the guest found itself in an impossible state


class Command(enum.IntEnum):
    """What the guest does after it reports a sync point (written to MB_COMMAND).

    ``session.command(Command.X, arg, arg2)`` passes ``arg`` in MB_ARG and
    ``arg2`` in MB_ARG2; the commands that read them:

    - ``SPIN``: ``arg`` loop iterations (32 bits) with no exit; the time they
      take depends on the host (measure it: a billion took seconds on kvm_pvm);
    - ``RAISE``: the exception vector ``arg`` (:data:`RAISABLE` per mode);
    - ``INT``: the software interrupt ``int $arg`` (8 bits);
    - ``APIC_ENABLE``: ``arg`` bit 0 selects x2APIC;
    - ``APIC_WRITE``/``APIC_READ``: LAPIC register ``arg2`` (xAPIC offset), value ``arg``;
    - ``IOAPIC_WRITE``: IOAPIC register ``arg2`` = ``arg``; ``WRMSR``: MSR ``arg2`` = ``arg``;
    - ``TSC_DEADLINE``: the deadline ``arg`` TSC ticks from now;
    - ``WAIT_LOG``: wait (``sti; hlt``) until this CPU's log holds ``arg`` records;
    - ``PIC_INIT``: ``arg``'s bytes: master base, slave base, master mask, slave mask.
    """

    NOP = 0        # nothing; report the next step
    CLI = 1        # cli
    STI = 2        # sti
    STI_NOP = 3    # sti; nop            (the nop sits in the STI shadow)
    MOV_SS = 4     # mov %ss,%ax; mov %ax,%ss; nop   (the nop sits in the MOV SS shadow)
    HLT = 5        # hlt
    STI_HLT = 6    # sti; hlt            (the hlt sits in the STI shadow)
    SPIN = 7       # spin MB_ARG iterations with no exit
    RAISE = 8      # raise exception MB_ARG (see RAISABLE), resume after it
    INT = 9        # int $MB_ARG (software interrupt)
    APIC_ENABLE = 10   # long: APIC base MSR EN (MB_ARG bit 0: and EXTD, x2APIC), SVR = 0x1FF
    APIC_WRITE = 11    # long: LAPIC register MB_ARG2 (xAPIC offset) = MB_ARG (ICR: 64 bits)
    APIC_READ = 12     # long: MB_RESULT = LAPIC register MB_ARG2
    IOAPIC_WRITE = 13  # long: IOAPIC indirect register MB_ARG2 = MB_ARG (32 bits)
    WRMSR = 14         # long: wrmsr(MB_ARG2, MB_ARG)
    TSC_DEADLINE = 15  # long: IA32_TSC_DEADLINE = rdtsc + MB_ARG
    WAIT_LOG = 16      # long: sti; hlt until this CPU's log holds MB_ARG records; returns with IF=0
    PIC_INIT = 17      # 8259 ICW1-4 + masks; MB_ARG bytes: master base, slave base, master mask, slave mask
    DONE = 18      # out PORT_DONE and stop


# How many bits of MB_ARG / MB_ARG2 each command reads (the rest would be dropped: SPIN reads
# %ecx, INT %cl); unlisted commands read all 64 or ignore the argument.
ARG_BITS = {Command.SPIN: 32, Command.INT: 8, Command.APIC_ENABLE: 1, Command.IOAPIC_WRITE: 32,
            Command.WAIT_LOG: 32, Command.PIC_INIT: 32}
ARG2_BITS = {Command.APIC_WRITE: 12, Command.APIC_READ: 12, Command.IOAPIC_WRITE: 8, Command.WRMSR: 32}

# The exceptions Command.RAISE makes each image raise: #DE, #BP, #UD everywhere; #GP needs a
# GDT (not in real mode); #PF needs paging (long mode only). Keyed by the image's mode name.
RAISABLE = {"real": frozenset({0, 3, 6}), "protected": frozenset({0, 3, 6, 13}),
            "long": frozenset({0, 3, 6, 13, 14})}

LONG_MODE_ONLY = frozenset({Command.APIC_ENABLE, Command.APIC_WRITE, Command.APIC_READ,
                            Command.IOAPIC_WRITE, Command.WRMSR, Command.TSC_DEADLINE,
                            Command.WAIT_LOG})
