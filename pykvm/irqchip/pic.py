"""The 8259 PIC pair: ``KVM_GET_IRQCHIP``'s PIC state decoded.

Why this exists: a real-mode guest's timer and legacy lines reach it through
the two 8259s; "is IRQ0 masked?", "what vector base did the guest program?"
are bits of ``struct kvm_pic_state``.
"""

from __future__ import annotations

import dataclasses

from ..core import checks
from ..core.constants import IrqchipId
from ..core.errors import InvalidArgument
from ..core.vm import Vm
from ..x86.vectors import vector_set

PIC_STATE_SIZE = 16


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
    def from_bytes(cls, raw: bytes) -> PicState:
        return cls(*raw[:PIC_STATE_SIZE])

    def to_bytes(self) -> bytes:
        return bytes(getattr(self, name) for name in _PIC_FIELDS)

    @property
    def irr(self) -> frozenset[int]:
        return vector_set([self.irr_bits])

    @property
    def imr(self) -> frozenset[int]:
        return vector_set([self.imr_bits])

    @property
    def isr(self) -> frozenset[int]:
        return vector_set([self.isr_bits])


def read(vm: Vm, chip: IrqchipId = IrqchipId.PIC_MASTER) -> PicState:
    """``KVM_GET_IRQCHIP`` of the master or slave in-kernel PIC, decoded (irqchip='kernel')."""
    checks.instance("vm", vm, Vm, "a pykvm.Vm made with irqchip='kernel'")
    if chip not in (IrqchipId.PIC_MASTER, IrqchipId.PIC_SLAVE):
        raise InvalidArgument(f"pic.read(chip={chip!r}): choose IrqchipId.PIC_MASTER or PIC_SLAVE")
    return PicState.from_bytes(vm.get_irqchip(chip))
