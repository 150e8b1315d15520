"""The irqchip layer: what the interrupt controllers' registers mean, and a userspace controller.

Why this exists: the core hands out raw chip state (``vcpu.get_lapic()``,
``vm.get_irqchip()``, ``vm.get_pit2()``); a test asks "is 0x41 in the ISR?",
"is IOAPIC pin 9 masked?", "tick every 10 ms". One module per device:
:mod:`~pykvm.irqchip.lapic`, :mod:`~pykvm.irqchip.ioapic`, :mod:`~pykvm.irqchip.pic`,
:mod:`~pykvm.irqchip.pit`; :mod:`~pykvm.irqchip.controller` is the pending-vector
logic a VMM needs for the userspace-irqchip path (``KVM_INTERRUPT``).
"""

from ..core.interrupts import (
    DeliveryMode,
    IrqchipMode,
    IrqchipRoute,
    MsiMessage,
    MsiRoute,
    Route,
    default_routes,
)
from . import controller, ioapic, lapic, pic, pit
from .controller import Injection, UserspaceIrqController

__all__ = ["DeliveryMode", "IrqchipMode", "IrqchipRoute", "MsiMessage", "MsiRoute", "Route",
           "default_routes", "controller", "ioapic", "lapic", "pic", "pit", "Injection",
           "UserspaceIrqController"]
