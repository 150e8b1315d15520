"""Guest-physical memory map, ports and command numbers of the pykvm guest images.

Why this exists: the host code (mode setup, log reader, command protocol) and the
assembly guests must agree on every address and number. This module is the one
place they are written down. The guests receive them at build time as
``as --defsym NAME=VALUE`` (see :func:`asm_defines`), so nothing is repeated in
the assembly sources.

Everything the real and protected images use lives below 1 MiB so that the
real-mode image reaches it with plain segment arithmetic. The long-mode image is
SMP-aware: each vCPU gets its own mailbox, stack and vector log (a
:class:`CpuArea`); vCPU 0's area is the one the other images use, the others sit
above 1 MiB. The host hands each vCPU its area in %r14 at entry.
"""

from __future__ import annotations

import dataclasses
import enum

# --- memory map (guest-physical) -------------------------------------------
IVT = 0x0000            # real-mode interrupt vector table (256 x 4 bytes)
GDT = 0x1000            # built by the host (pykvm.x86)
IDT = 0x2000            # built by the guest image itself
TSS = 0x3000            # 64-bit / 32-bit TSS, built by the host
PML4 = 0x4000           # identity page tables, built by the host:
PDPT = 0x5000           #   PML4 -> PDPT -> 4 page directories of 2 MiB pages
PD = 0x6000             #   0x6000..0x9fff, covering guest-physical 0..4 GiB
MAILBOX = 0xA000        # host <-> guest command mailbox (see MAILBOX_* below)
STACK_BOTTOM = 0xB000
STACK_TOP = 0xF000      # initial stack pointer of every image
CODE = 0x10000          # load address of the image code
REAL_MODE_CS = CODE >> 4  # real mode runs the image at CS:IP = 0x1000:offset
LOG = 0x20000           # vector log: header, then records
SCRATCH = 0x30000       # free for tests and labs
AP_AREAS = 0x100000     # per-CPU areas of vCPUs 1.. (long mode), AP_AREA_SIZE apart
AP_AREA_SIZE = 0x20000  #   mailbox at +0, stack below +AP_STACK_TOP, log at +AP_LOG
AP_STACK_TOP = 0x8000
AP_LOG = 0x10000
MAX_CPUS = 64           # areas of vCPUs 0..63 fit below 9.5 MiB

# --- interrupt controllers as the guest sees them ----------------------------------
XAPIC_BASE = 0xFEE00000     # LAPIC MMIO page (xAPIC mode); 4 GiB identity map covers it
IOAPIC_BASE = 0xFEC00000    # IOAPIC index register; data register at +0x10
APIC_BASE_MSR = 0x1B
TSC_DEADLINE_MSR = 0x6E0

# --- GDT selectors (pykvm.x86 builds this GDT) --------------------------------
SEL_CODE32 = 0x08
SEL_DATA = 0x10
SEL_CODE64 = 0x18
SEL_TSS = 0x20          # 16-byte system descriptor in long mode

# --- vector log ------------------------------------------------------------
LOG_HEADER_SIZE = 64    # u32 count of records ever written, u32 capacity
LOG_RECORD_SIZE = 64
LOG_CAPACITY = (0x10000 - LOG_HEADER_SIZE) // LOG_RECORD_SIZE  # fits one real-mode segment
# record layout (offsets)
REC_SEQ = 0             # u32 sequence number (0, 1, 2, ...)
REC_VECTOR = 4          # u16 vector
REC_CS = 6              # u16 interrupted CS
REC_ERROR_CODE = 8      # u32 error code (valid if REC_FLAG_ERROR_CODE)
REC_FLAGS = 12          # u32 REC_FLAG_*
REC_RIP = 16            # u64 interrupted RIP (IP offset in real mode)
REC_RFLAGS = 24         # u64 interrupted RFLAGS
REC_TSC = 32            # u64 guest TSC when the handler ran
REC_CR2 = 40            # u64 CR2 (valid if REC_FLAG_CR2)
REC_RSP = 48            # u64 interrupted stack pointer
REC_CPU = 56            # u32 initial APIC ID of the CPU that took the vector
REC_FLAG_ERROR_CODE = 1
REC_FLAG_CR2 = 2
REC_FLAG_FIXUP = 4      # the handler resumed an expected exception at the fixup address

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
    """What the guest does after it reports a sync point (written to MB_COMMAND)."""

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


LONG_MODE_ONLY = frozenset({Command.APIC_ENABLE, Command.APIC_WRITE, Command.APIC_READ,
                            Command.IOAPIC_WRITE, Command.WRMSR, Command.TSC_DEADLINE,
                            Command.WAIT_LOG})


@dataclasses.dataclass(frozen=True)
class CpuArea:
    """Where one vCPU's mailbox, stack and vector log live (long-mode image)."""

    mailbox: int
    stack_top: int
    log: int


def cpu_area(cpu: int) -> CpuArea:
    """vCPU ``cpu``'s area: vCPU 0 uses MAILBOX / STACK_TOP / LOG, the others AP_AREAS."""
    if not 0 <= cpu < MAX_CPUS:
        raise ValueError(f"vCPU {cpu} has no guest area: the images support vCPUs 0..{MAX_CPUS - 1}")
    if cpu == 0:
        return CpuArea(MAILBOX, STACK_TOP, LOG)
    base = AP_AREAS + (cpu - 1) * AP_AREA_SIZE
    return CpuArea(base, base + AP_STACK_TOP, base + AP_LOG)


def asm_defines() -> dict[str, int]:
    """Every integer above, as ``--defsym`` values for the guest sources."""
    defines = {name: value for name, value in globals().items()
               if name.isupper() and isinstance(value, int)}
    defines.update({f"CMD_{c.name}": int(c) for c in Command})
    return defines
