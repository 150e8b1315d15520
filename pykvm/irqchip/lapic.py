"""The local APIC: register offsets, LVT entries, ICR values, and ``KVM_GET_LAPIC`` decoded.

Why this exists: ``KVM_GET_LAPIC`` returns 1 KiB of raw registers; a test wants
"is 0x41 in the ISR?", "what does the timer LVT say?". ICR values are bit
fields that are easy to get wrong. Layouts from the Intel SDM Vol. 3A chapter
"Advanced Programmable Interrupt Controller (APIC)".
"""

from __future__ import annotations

import dataclasses
import enum
import struct

from ..core import checks
from ..core.constants import as_enum
from ..core.errors import InvalidArgument
from ..core.interrupts import DeliveryMode, check_vector
from ..core.vcpu import Vcpu
from ..x86.vectors import vector_set

LAPIC_SIZE = 0x400


class ApicReg(enum.IntEnum):
    """xAPIC register offsets (x2APIC MSR = 0x800 + offset / 16)."""

    ID = 0x20
    VERSION = 0x30
    TPR = 0x80
    APR = 0x90
    PPR = 0xA0
    EOI = 0xB0
    RRD = 0xC0
    LDR = 0xD0
    DFR = 0xE0
    SVR = 0xF0
    ISR = 0x100
    TMR = 0x180
    IRR = 0x200
    ESR = 0x280
    LVT_CMCI = 0x2F0
    ICR_LOW = 0x300
    ICR_HIGH = 0x310
    LVT_TIMER = 0x320
    LVT_THERMAL = 0x330
    LVT_PMC = 0x340
    LVT_LINT0 = 0x350
    LVT_LINT1 = 0x360
    LVT_ERROR = 0x370
    TIMER_INITIAL = 0x380
    TIMER_CURRENT = 0x390
    TIMER_DIVIDE = 0x3E0
    SELF_IPI = 0x3F0


def x2apic_msr(register: int) -> int:
    """The x2APIC MSR of an xAPIC register offset."""
    checks.integer("register", register, 0, 0x3F0, "an xAPIC register offset, e.g. ApicReg.EOI")
    return 0x800 + (register >> 4)


class TimerMode(enum.IntEnum):
    ONE_SHOT = 0
    PERIODIC = 1
    TSC_DEADLINE = 2


class DestinationShorthand(enum.IntEnum):
    NONE = 0
    SELF = 1
    ALL_INCLUDING_SELF = 2
    ALL_EXCLUDING_SELF = 3


# -- LAPIC ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LvtEntry:
    """A local vector table entry."""

    vector: int
    delivery_mode: DeliveryMode | int
    pending: bool
    active_low: bool
    remote_irr: bool
    level_triggered: bool
    masked: bool
    timer_mode: TimerMode | int | None = None

    @classmethod
    def from_bits(cls, value: int, timer: bool = False) -> LvtEntry:
        timer_mode = as_enum(TimerMode, value >> 17 & 3) if timer else None
        return cls(value & 0xFF, as_enum(DeliveryMode, value >> 8 & 7), bool(value >> 12 & 1), bool(value >> 13 & 1),
                   bool(value >> 14 & 1), bool(value >> 15 & 1), bool(value >> 16 & 1), timer_mode)


_LVT = {"timer": ApicReg.LVT_TIMER, "thermal": ApicReg.LVT_THERMAL, "pmc": ApicReg.LVT_PMC,
        "lint0": ApicReg.LVT_LINT0, "lint1": ApicReg.LVT_LINT1, "error": ApicReg.LVT_ERROR,
        "cmci": ApicReg.LVT_CMCI}
_DIVISORS = {0b000: 2, 0b001: 4, 0b010: 8, 0b011: 16, 0b100: 32, 0b101: 64, 0b110: 128, 0b111: 1}


def read_register(raw: bytes, register: int) -> int:
    return struct.unpack_from("<I", raw, register)[0]


def with_register(raw: bytes, register: int, value: int) -> bytes:
    """``raw`` LAPIC registers with one 32-bit register replaced (for KVM_SET_LAPIC)."""
    data = bytearray(raw)
    struct.pack_into("<I", data, register, value & 0xFFFFFFFF)
    return bytes(data)


@dataclasses.dataclass(frozen=True)
class LapicState:
    """``struct kvm_lapic_state`` decoded."""

    id: int
    version: int
    tpr: int
    apr: int
    ppr: int
    ldr: int
    dfr: int
    svr: int
    isr: frozenset[int]
    irr: frozenset[int]
    tmr: frozenset[int]
    esr: int
    icr: int
    lvt: dict[str, LvtEntry]
    timer_initial: int
    timer_current: int
    timer_divide: int
    raw: bytes = dataclasses.field(repr=False)

    @classmethod
    def from_bytes(cls, raw: bytes, x2apic: bool = False) -> LapicState:
        """Decode; ``x2apic=True`` means the ID register holds the full 32-bit x2APIC ID (KVM_CAP_X2APIC_API)."""
        if len(raw) < LAPIC_SIZE:
            raise InvalidArgument(f"LAPIC state is {LAPIC_SIZE} bytes, got {len(raw)}")
        reg = lambda offset: read_register(raw, offset)   # noqa: E731

        def bitmap(base: int) -> frozenset[int]:
            return vector_set([reg(base + 0x10 * i) for i in range(8)])
        divide = reg(ApicReg.TIMER_DIVIDE)
        apic_id = reg(ApicReg.ID)
        return cls(
            id=apic_id if x2apic else apic_id >> 24, version=reg(ApicReg.VERSION),
            tpr=reg(ApicReg.TPR), apr=reg(ApicReg.APR), ppr=reg(ApicReg.PPR), ldr=reg(ApicReg.LDR),
            dfr=reg(ApicReg.DFR), svr=reg(ApicReg.SVR), isr=bitmap(ApicReg.ISR), irr=bitmap(ApicReg.IRR),
            tmr=bitmap(ApicReg.TMR), esr=reg(ApicReg.ESR),
            icr=reg(ApicReg.ICR_LOW) | reg(ApicReg.ICR_HIGH) << 32,
            lvt={name: LvtEntry.from_bits(reg(offset), timer=name == "timer") for name, offset in _LVT.items()},
            timer_initial=reg(ApicReg.TIMER_INITIAL), timer_current=reg(ApicReg.TIMER_CURRENT),
            timer_divide=_DIVISORS[(divide & 3) | (divide >> 1 & 4)], raw=bytes(raw[:LAPIC_SIZE]))

    @property
    def software_enabled(self) -> bool:
        return bool(self.svr & 0x100)

    @property
    def spurious_vector(self) -> int:
        return self.svr & 0xFF

    @property
    def highest_isr(self) -> int | None:
        return max(self.isr, default=None)

    @property
    def highest_irr(self) -> int | None:
        return max(self.irr, default=None)

    def with_register(self, register: int, value: int) -> bytes:
        return with_register(self.raw, register, value)

    def describe(self) -> str:
        hexes = lambda vectors: "[" + ", ".join(f"{v:#x}" for v in sorted(vectors)) + "]"   # noqa: E731
        return (f"LAPIC id={self.id} tpr={self.tpr:#x} ppr={self.ppr:#x} svr={self.svr:#x} "
                f"isr={hexes(self.isr)} irr={hexes(self.irr)} tmr={hexes(self.tmr)} "
                f"timer: {self.lvt['timer']} initial={self.timer_initial} "
                f"current={self.timer_current} divide={self.timer_divide}")


def icr(vector: int, delivery_mode: DeliveryMode = DeliveryMode.FIXED, destination: int = 0,
        logical: bool = False, level_assert: bool = True, trigger_level: bool = False,
        shorthand: DestinationShorthand = DestinationShorthand.NONE, x2apic: bool = False) -> int:
    """A 64-bit ICR value (xAPIC: destination in bits 63:56; x2APIC: bits 63:32)."""
    check_vector(vector)
    checks.integer("delivery_mode", delivery_mode, 0, 7, "a DeliveryMode member")
    checks.unsigned("destination", destination, 32 if x2apic else 8,
                    "an APIC ID: 8 bits in xAPIC mode, 32 in x2APIC mode")
    checks.integer("shorthand", shorthand, 0, 3, "a DestinationShorthand member")
    low = (vector | int(delivery_mode) << 8 | int(logical) << 11 | int(level_assert) << 14
           | int(trigger_level) << 15 | int(shorthand) << 18)
    return low | destination << (32 if x2apic else 56)


def read(vcpu: Vcpu) -> LapicState:
    """``KVM_GET_LAPIC`` of ``vcpu``, decoded (needs irqchip 'kernel' or 'split')."""
    checks.instance("vcpu", vcpu, Vcpu, "a pykvm.Vcpu of a VM with irqchip='kernel' or 'split'")
    # pykvm does not enable KVM_CAP_X2APIC_API, so KVM keeps the ID in bits 31:24 in both modes.
    return LapicState.from_bytes(vcpu.get_lapic(), x2apic=False)
