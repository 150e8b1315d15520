"""The IOAPIC: redirection entries and ``KVM_GET_IRQCHIP``'s IOAPIC state decoded.

Why this exists: "is pin 9 masked?", "is remote IRR set on the level-triggered
pin?" are questions about bits of ``struct kvm_ioapic_state``. Layout from the
82093AA IOAPIC datasheet and ``<asm/kvm.h>``.
"""

from __future__ import annotations

import dataclasses
import struct

from ..core import checks
from ..core.constants import IOAPIC_NUM_PINS, IrqchipId, as_enum
from ..core.interrupts import DeliveryMode, check_vector
from ..core.vm import Vm
from ..x86.vectors import vector_set


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
        check_vector(self.vector)
        checks.integer("delivery_mode", self.delivery_mode, 0, 7, "a DeliveryMode member")
        checks.unsigned("destination", self.destination, 8, "an IOAPIC destination is an 8-bit APIC ID")

    @property
    def bits(self) -> int:
        return (self.vector | int(self.delivery_mode) << 8 | int(self.logical) << 11
                | int(self.delivery_pending) << 12 | int(self.active_low) << 13
                | int(self.remote_irr) << 14 | int(self.level_triggered) << 15
                | int(self.masked) << 16 | self.destination << 56)

    @classmethod
    def from_bits(cls, value: int) -> RedirectionEntry:
        return cls(value & 0xFF, as_enum(DeliveryMode, value >> 8 & 7), bool(value >> 11 & 1), bool(value >> 12 & 1),
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
    def from_bytes(cls, raw: bytes) -> IoapicState:
        base, ioregsel, ioapic_id, irr, _ = _IOAPIC_HEAD.unpack_from(raw)
        entries = struct.unpack_from(f"<{IOAPIC_NUM_PINS}Q", raw, _IOAPIC_HEAD.size)
        return cls(base, ioregsel, ioapic_id, vector_set([irr]),
                   tuple(RedirectionEntry.from_bits(e) for e in entries),
                   bytes(raw[:_IOAPIC_HEAD.size + 8 * IOAPIC_NUM_PINS]))

    def entry_bits(self, pin: int) -> int:
        """Pin ``pin``'s 64 raw bits, with those :class:`RedirectionEntry` omits (an IOMMU's remappable format)."""
        checks.integer("pin", pin, 0, IOAPIC_NUM_PINS - 1, f"the IOAPIC has {IOAPIC_NUM_PINS} pins")
        return int(struct.unpack_from("<Q", self.raw, _IOAPIC_HEAD.size + 8 * pin)[0])

    def with_entry(self, pin: int, entry: RedirectionEntry) -> IoapicState:
        checks.integer("pin", pin, 0, IOAPIC_NUM_PINS - 1, f"the IOAPIC has {IOAPIC_NUM_PINS} pins")
        checks.instance("entry", entry, RedirectionEntry, "e.g. RedirectionEntry(vector=0x40)")
        data = bytearray(self.raw)
        struct.pack_into("<Q", data, _IOAPIC_HEAD.size + 8 * pin, entry.bits)
        return IoapicState.from_bytes(bytes(data))

    def to_bytes(self) -> bytes:
        return self.raw


def read(vm: Vm) -> IoapicState:
    """``KVM_GET_IRQCHIP`` of the in-kernel IOAPIC, decoded (irqchip='kernel')."""
    checks.instance("vm", vm, Vm, "a pykvm.Vm made with irqchip='kernel'")
    return IoapicState.from_bytes(vm.get_irqchip(IrqchipId.IOAPIC))


def write(vm: Vm, state: IoapicState) -> None:
    """``KVM_SET_IRQCHIP`` of the in-kernel IOAPIC (e.g. ``read(vm).with_entry(pin, entry)``)."""
    checks.instance("vm", vm, Vm, "a pykvm.Vm made with irqchip='kernel'")
    checks.instance("state", state, IoapicState, "e.g. ioapic.read(vm).with_entry(pin, entry)")
    vm.set_irqchip(IrqchipId.IOAPIC, state.raw)
