"""Guest-physical memory map of the pykvm guest images, and every number they are built with.

Why this exists: the host code (log reader, sessions) and the assembly guests
must agree on every address. The images' own areas are written down here, the
x86 system area comes from :mod:`pykvm.x86.system_area` and the command
protocol from :mod:`pykvm.guests.protocol`. The guests receive all of them at
build time as ``as --defsym NAME=VALUE`` (see :func:`asm_defines`), so nothing
is repeated in the assembly sources. setup.py imports this module before the
binding exists, so it imports only binding-free modules.

Everything the real and protected images use lives below 1 MiB so that the
real-mode image reaches it with plain segment arithmetic. The long-mode image is
SMP-aware: each vCPU gets its own mailbox, stack and vector log (a
:class:`CpuArea`); vCPU 0's area is the one the other images use, the others sit
above 1 MiB. The host hands each vCPU its area in %r14 at entry.
"""

from __future__ import annotations

import dataclasses

from ..core.constants import IOAPIC_DEFAULT_BASE as IOAPIC_BASE
from ..core.errors import InvalidArgument
from ..x86.msr import APIC_BASE_MSR, TSC_DEADLINE_MSR, XAPIC_BASE
from ..x86.system_area import (
    DEFAULT_STACK_TOP,
    FREE_MEMORY,
    GDT,
    IDT,
    IVT,
    PML4,
    SEL_CODE32,
    SEL_CODE64,
    SEL_DATA,
    SEL_TSS,
    SYSTEM_AREA_END,
    TSS,
)
from . import protocol

# --- memory map (guest-physical) -------------------------------------------
# 0x0000-0x9FFF: the x86 system area (IVT, GDT, IDT, TSS, page tables); the
# images build their own IVT / IDT there.
MAILBOX = SYSTEM_AREA_END   # host <-> guest command mailbox (pykvm.guests.protocol)
STACK_TOP = DEFAULT_STACK_TOP   # initial stack pointer of every image
CODE = FREE_MEMORY      # load address of the image code
REAL_MODE_CS = CODE >> 4  # real mode runs the image at CS:IP = 0x1000:offset
LOG = 0x20000           # vector log: header, then records
SCRATCH = 0x30000       # free for tests and labs
AP_AREAS = 0x100000     # per-CPU areas of vCPUs 1.. (long mode), AP_AREA_SIZE apart
AP_AREA_SIZE = 0x20000  #   mailbox at +0, stack below +AP_STACK_TOP, log at +AP_LOG
AP_STACK_TOP = 0x8000
AP_LOG = 0x10000
MAX_CPUS = 64           # areas of vCPUs 0..63 fit below 9.5 MiB

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

@dataclasses.dataclass(frozen=True)
class CpuArea:
    """Where one vCPU's mailbox, stack and vector log live (long-mode image)."""

    mailbox: int
    stack_top: int
    log: int


def cpu_area(cpu: int) -> CpuArea:
    """vCPU ``cpu``'s area: vCPU 0 uses MAILBOX / STACK_TOP / LOG, the others AP_AREAS."""
    if not 0 <= cpu < MAX_CPUS:
        raise InvalidArgument(f"vCPU {cpu} has no guest area: the images support vCPUs 0..{MAX_CPUS - 1}")
    if cpu == 0:
        return CpuArea(MAILBOX, STACK_TOP, LOG)
    base = AP_AREAS + (cpu - 1) * AP_AREA_SIZE
    return CpuArea(base, base + AP_STACK_TOP, base + AP_LOG)


# Named here so the assembler gets them; each is defined where it belongs.
_IMPORTED = (IOAPIC_BASE, APIC_BASE_MSR, TSC_DEADLINE_MSR, XAPIC_BASE, GDT, IDT, IVT, PML4, SEL_CODE32,
             SEL_CODE64, SEL_DATA, SEL_TSS, TSS)


def asm_defines() -> dict[str, int]:
    """Every integer above and in the protocol, as ``--defsym`` values for the guest sources."""
    defines = {name: value for module in (globals(), vars(protocol)) for name, value in module.items()
               if name.isupper() and isinstance(value, int) and not name.startswith("_")}
    defines.update({f"CMD_{c.name}": int(c) for c in protocol.Command})
    return defines
