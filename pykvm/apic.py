"""Local APIC, IOAPIC, 8259 PIC and MSI formats: decode what KVM reports, encode what it takes.

Why this exists: ``KVM_GET_LAPIC`` returns 1 KiB of raw APIC registers and
``KVM_GET_IRQCHIP`` raw PIC / IOAPIC structs; a test wants "is 0x41 in the
ISR?", "is IOAPIC pin 9 masked?". MSIs and ICR values are bit fields that are
easy to get wrong. Everything here is pure data (no ioctls): layouts from the
Intel SDM Vol. 3 (chapter 11 "APIC", "Message Signalled Interrupts") and the
KVM uapi structs in ``<asm/kvm.h>``.
"""

from __future__ import annotations

import dataclasses
import enum
import struct

from .errors import InvalidMsi, InvalidVector

XAPIC_DEFAULT_BASE = 0xFEE00000
IOAPIC_DEFAULT_BASE = 0xFEC00000
APIC_BASE_MSR = 0x1B
APIC_BASE_BSP = 1 << 8
APIC_BASE_EXTD = 1 << 10
APIC_BASE_ENABLE = 1 << 11
TSC_DEADLINE_MSR = 0x6E0
LAPIC_SIZE = 0x400
PIC_STATE_SIZE = 16
IOAPIC_PINS = 24


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
    return 0x800 + (register >> 4)


class DeliveryMode(enum.IntEnum):
    FIXED = 0
    LOWEST_PRIORITY = 1
    SMI = 2
    NMI = 4
    INIT = 5
    STARTUP = 6
    EXTINT = 7


class TimerMode(enum.IntEnum):
    ONE_SHOT = 0
    PERIODIC = 1
    TSC_DEADLINE = 2


class DestinationShorthand(enum.IntEnum):
    NONE = 0
    SELF = 1
    ALL_INCLUDING_SELF = 2
    ALL_EXCLUDING_SELF = 3


def _check_vector(vector: int) -> None:
    if not 0 <= vector <= 0xFF:
        raise InvalidVector(f"vector {vector:#x} does not exist: x86 vectors are 0..255")


def _vectors(bitmap_words: list[int]) -> frozenset[int]:
    return frozenset(32 * word + bit for word, value in enumerate(bitmap_words)
                     for bit in range(32) if value >> bit & 1)


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
    def from_bits(cls, value: int, timer: bool = False) -> "LvtEntry":
        mode = value >> 8 & 7
        try:
            mode = DeliveryMode(mode)
        except ValueError:
            pass
        timer_mode = None
        if timer:
            timer_mode = value >> 17 & 3
            try:
                timer_mode = TimerMode(timer_mode)
            except ValueError:
                pass
        return cls(value & 0xFF, mode, bool(value >> 12 & 1), bool(value >> 13 & 1),
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
    def from_bytes(cls, raw: bytes, x2apic: bool = False) -> "LapicState":
        """Decode; ``x2apic=True`` means the ID register holds the full 32-bit x2APIC ID (KVM_CAP_X2APIC_API)."""
        if len(raw) < LAPIC_SIZE:
            raise ValueError(f"LAPIC state is {LAPIC_SIZE} bytes, got {len(raw)}")
        reg = lambda offset: read_register(raw, offset)   # noqa: E731

        def bitmap(base: int) -> frozenset[int]:
            return _vectors([reg(base + 0x10 * i) for i in range(8)])
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
    _check_vector(vector)
    limit = 0xFFFFFFFF if x2apic else 0xFF
    if not 0 <= destination <= limit:
        raise ValueError(f"ICR destination {destination:#x} does not fit ({'32' if x2apic else '8'} bits)")
    low = (vector | int(delivery_mode) << 8 | int(logical) << 11 | int(level_assert) << 14
           | int(trigger_level) << 15 | int(shorthand) << 18)
    return low | destination << (32 if x2apic else 56)


# -- MSI -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MsiMessage:
    """An MSI as KVM_SIGNAL_MSI and MSI routes take it."""

    address_lo: int
    address_hi: int
    data: int

    @property
    def address(self) -> int:
        return self.address_hi << 32 | self.address_lo

    @property
    def destination(self) -> int:
        return self.address_lo >> 12 & 0xFF

    @property
    def vector(self) -> int:
        return self.data & 0xFF

    @property
    def delivery_mode(self) -> int:
        return self.data >> 8 & 7

    @property
    def logical(self) -> bool:
        return bool(self.address_lo >> 2 & 1)


def compose_msi(destination: int, vector: int, delivery_mode: DeliveryMode = DeliveryMode.FIXED,
                logical: bool = False, redirection_hint: bool = False, trigger_level: bool = False,
                level_assert: bool = True) -> MsiMessage:
    """Address 0xFEE<dest:8><rsvd:8><RH><DM>00, data <trigger><level><rsvd:3><mode:3><vector:8>.

    Destinations are 8-bit APIC IDs (extended x2APIC destinations in address_hi are not composed).
    """
    _check_vector(vector)
    if not 0 <= destination <= 0xFF:
        raise InvalidMsi(f"MSI destination {destination:#x} does not fit the 8-bit destination field")
    address = XAPIC_DEFAULT_BASE | destination << 12 | int(redirection_hint) << 3 | int(logical) << 2
    data = vector | int(delivery_mode) << 8 | int(level_assert) << 14 | int(trigger_level) << 15
    message = MsiMessage(address, 0, data)
    validate_msi(message.address, message.data)
    return message


def validate_msi(address: int, data: int) -> None:
    """Raise :class:`InvalidMsi` for an address/data pair with reserved bits set."""
    low = address & 0xFFFFFFFF
    if low >> 20 != 0xFEE:
        raise InvalidMsi(f"MSI address {address:#x}: bits 31:20 must be 0xFEE (the interrupt "
                         f"message range); compose it with pykvm.apic.compose_msi()")
    if low & 0x3:
        raise InvalidMsi(f"MSI address {address:#x}: bits 1:0 are reserved and must be 0")
    if data >> 16:
        raise InvalidMsi(f"MSI data {data:#x}: bits 31:16 are reserved and must be 0")
    if data >> 11 & 7:
        raise InvalidMsi(f"MSI data {data:#x}: bits 13:11 are reserved and must be 0")
    mode = data >> 8 & 7
    if mode in (3, 6):
        raise InvalidMsi(f"MSI data {data:#x}: delivery mode {mode} is reserved for MSIs")
    if mode in (DeliveryMode.FIXED, DeliveryMode.LOWEST_PRIORITY) and data & 0xFF < 16:
        raise InvalidMsi(f"MSI data {data:#x}: vector {data & 0xFF} is illegal for fixed delivery "
                         f"(vectors 0-15 are reserved); use 16..255")


# -- IOAPIC ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RedirectionEntry:
    """One IOAPIC redirection table entry (64 bits)."""

    vector: int
    delivery_mode: DeliveryMode | int = DeliveryMode.FIXED
    logical: bool = False
    delivery_pending: bool = False
    active_low: bool = False
    remote_irr: bool = False
    level_triggered: bool = False
    masked: bool = False
    destination: int = 0

    def __post_init__(self) -> None:
        _check_vector(self.vector)
        if not 0 <= self.destination <= 0xFF:
            raise ValueError(f"IOAPIC destination {self.destination:#x} does not fit 8 bits")

    @property
    def bits(self) -> int:
        return (self.vector | int(self.delivery_mode) << 8 | int(self.logical) << 11
                | int(self.delivery_pending) << 12 | int(self.active_low) << 13
                | int(self.remote_irr) << 14 | int(self.level_triggered) << 15
                | int(self.masked) << 16 | self.destination << 56)

    @classmethod
    def from_bits(cls, value: int) -> "RedirectionEntry":
        mode = value >> 8 & 7
        try:
            mode = DeliveryMode(mode)
        except ValueError:
            pass
        return cls(value & 0xFF, mode, bool(value >> 11 & 1), bool(value >> 12 & 1),
                   bool(value >> 13 & 1), bool(value >> 14 & 1), bool(value >> 15 & 1),
                   bool(value >> 16 & 1), value >> 56 & 0xFF)


_IOAPIC_HEAD = struct.Struct("<QIIII")   # base_address, ioregsel, id, irr, pad


@dataclasses.dataclass(frozen=True)
class IoapicState:
    """``struct kvm_ioapic_state`` decoded."""

    base_address: int
    ioregsel: int
    id: int
    irr: frozenset[int]
    redirection: tuple[RedirectionEntry, ...]
    raw: bytes = dataclasses.field(repr=False)

    @classmethod
    def from_bytes(cls, raw: bytes) -> "IoapicState":
        base, ioregsel, ioapic_id, irr, _ = _IOAPIC_HEAD.unpack_from(raw)
        entries = struct.unpack_from(f"<{IOAPIC_PINS}Q", raw, _IOAPIC_HEAD.size)
        return cls(base, ioregsel, ioapic_id, _vectors([irr]),
                   tuple(RedirectionEntry.from_bits(e) for e in entries),
                   bytes(raw[:_IOAPIC_HEAD.size + 8 * IOAPIC_PINS]))

    def with_entry(self, pin: int, entry: RedirectionEntry) -> "IoapicState":
        if not 0 <= pin < IOAPIC_PINS:
            raise ValueError(f"the IOAPIC has pins 0..{IOAPIC_PINS - 1}, not {pin}")
        data = bytearray(self.raw)
        struct.pack_into("<Q", data, _IOAPIC_HEAD.size + 8 * pin, entry.bits)
        return IoapicState.from_bytes(bytes(data))

    def to_bytes(self) -> bytes:
        return self.raw


# -- 8259 PIC --------------------------------------------------------------------------------
_PIC_FIELDS = ("last_irr", "irr_bits", "imr_bits", "isr_bits", "priority_add", "irq_base",
               "read_reg_select", "poll", "special_mask", "init_state", "auto_eoi",
               "rotate_on_auto_eoi", "special_fully_nested_mode", "init4", "elcr", "elcr_mask")


@dataclasses.dataclass(frozen=True)
class PicState:
    """``struct kvm_pic_state`` (16 bytes, header order) decoded; irr/imr/isr also as pin sets."""

    last_irr: int
    irr_bits: int
    imr_bits: int
    isr_bits: int
    priority_add: int
    irq_base: int
    read_reg_select: int
    poll: int
    special_mask: int
    init_state: int
    auto_eoi: int
    rotate_on_auto_eoi: int
    special_fully_nested_mode: int
    init4: int
    elcr: int
    elcr_mask: int

    @classmethod
    def from_bytes(cls, raw: bytes) -> "PicState":
        return cls(*raw[:PIC_STATE_SIZE])

    def to_bytes(self) -> bytes:
        return bytes(getattr(self, name) for name in _PIC_FIELDS)

    @property
    def irr(self) -> frozenset[int]:
        return _vectors([self.irr_bits])

    @property
    def imr(self) -> frozenset[int]:
        return _vectors([self.imr_bits])

    @property
    def isr(self) -> frozenset[int]:
        return _vectors([self.isr_bits])
