"""Irqchip modes and GSI routing entries of a VM.

Why this exists: where interrupt controllers live decides which injection
paths a VM has. With ``none`` userspace injects with ``KVM_INTERRUPT``; with
``kernel`` KVM emulates the 8259 PICs, the IOAPIC and every LAPIC, and
interrupts enter through GSIs (``KVM_IRQ_LINE``, irqfd) or MSIs; with
``split`` only the LAPICs are in the kernel and GSIs must be routed as MSIs.
This module names the modes, says what each allows, and checks routing
entries before KVM sees them, so a mistake gets a message instead of EINVAL.
"""

from __future__ import annotations

import dataclasses
import enum

from .apic import MsiMessage, validate_msi
from .constants import IOAPIC_NUM_PINS, PIC_PINS, IrqchipId, RoutingType
from .errors import InvalidRouting

MAX_IRQ_ROUTES = 4096     # KVM_MAX_IRQ_ROUTES on x86 (include/linux/kvm_host.h)
PINS_PER_PIC = 8


class IrqchipMode(str, enum.Enum):
    """Where the interrupt controllers of a VM live (``Kvm.create_vm(irqchip=...)``)."""

    NONE = "none"        # userspace irqchip: KVM_INTERRUPT, no LAPIC
    KERNEL = "kernel"    # KVM_CREATE_IRQCHIP: PICs + IOAPIC + LAPICs in the kernel
    SPLIT = "split"      # KVM_CAP_SPLIT_IRQCHIP: LAPICs in the kernel, PIC/IOAPIC in userspace

    @property
    def lapic_in_kernel(self) -> bool:
        return self != IrqchipMode.NONE

    @property
    def ioapic_in_kernel(self) -> bool:
        return self == IrqchipMode.KERNEL


@dataclasses.dataclass(frozen=True)
class IrqchipRoute:
    """GSI ``gsi`` drives ``pin`` of an in-kernel PIC or the IOAPIC."""

    gsi: int
    chip: IrqchipId
    pin: int

    def validate(self, mode: IrqchipMode) -> None:
        _check_gsi(self.gsi)
        if not mode.ioapic_in_kernel:
            raise InvalidRouting(f"GSI {self.gsi}: an irqchip route needs the in-kernel PIC/IOAPIC, "
                                 f"but this VM's irqchip is {mode.value!r}; route it as an MSI "
                                 f"(MsiRoute) or create the VM with irqchip='kernel'")
        pins = IOAPIC_NUM_PINS if self.chip == IrqchipId.IOAPIC else PINS_PER_PIC
        if not 0 <= self.pin < pins:
            raise InvalidRouting(f"GSI {self.gsi}: {IrqchipId(self.chip).name} has pins 0..{pins - 1}, "
                                 f"not {self.pin}")

    def to_c(self, entry) -> None:
        entry.gsi, entry.type = self.gsi, RoutingType.IRQCHIP
        entry.u.irqchip.irqchip, entry.u.irqchip.pin = int(self.chip), self.pin


@dataclasses.dataclass(frozen=True)
class MsiRoute:
    """GSI ``gsi`` sends MSI ``message`` (see :func:`pykvm.apic.compose_msi`)."""

    gsi: int
    message: MsiMessage

    def validate(self, mode: IrqchipMode) -> None:
        _check_gsi(self.gsi)
        if not mode.lapic_in_kernel:
            raise InvalidRouting(f"GSI {self.gsi}: MSI routes need an in-kernel LAPIC; create the VM "
                                 f"with irqchip='kernel' or 'split'")
        validate_msi(self.message.address, self.message.data)

    def to_c(self, entry) -> None:
        entry.gsi, entry.type = self.gsi, RoutingType.MSI
        msi = entry.u.msi
        msi.address_lo, msi.address_hi, msi.data = (self.message.address_lo,
                                                   self.message.address_hi, self.message.data)


Route = IrqchipRoute | MsiRoute


def _check_gsi(gsi: int) -> None:
    if not 0 <= gsi < MAX_IRQ_ROUTES:
        raise InvalidRouting(f"GSI {gsi} is out of range: KVM routes GSIs 0..{MAX_IRQ_ROUTES - 1}")


def default_routes(mode: IrqchipMode) -> tuple[Route, ...]:
    """The routing KVM installs itself: with ``kernel``, GSI 0-15 to both PICs and IOAPIC, 16-23 to the IOAPIC.

    (``kvm_setup_default_irq_routing``; GSI 2 goes to IOAPIC pin 2 and to the
    master PIC's cascade pin, as in KVM.) ``none`` and ``split`` start empty.
    """
    if mode != IrqchipMode.KERNEL:
        return ()
    routes: list[Route] = []
    for gsi in range(IOAPIC_NUM_PINS):
        if gsi < PIC_PINS:
            chip = IrqchipId.PIC_MASTER if gsi < PINS_PER_PIC else IrqchipId.PIC_SLAVE
            routes.append(IrqchipRoute(gsi, chip, gsi % PINS_PER_PIC))
        routes.append(IrqchipRoute(gsi, IrqchipId.IOAPIC, gsi))
    return tuple(routes)


PIT_HZ = 1_193_182          # the 8254's input clock


@dataclasses.dataclass(frozen=True)
class PitChannel:
    """One 8254 channel as ``KVM_GET_PIT2`` reports it."""

    count: int              # the reload value; 0 stands for 65536
    mode: int               # 0-5; KVM reports 0xff for a channel never programmed
    gate: int
    rw_mode: int            # 1 LSB, 2 MSB, 3 LSB then MSB

    @classmethod
    def from_c(cls, channel) -> "PitChannel":
        return cls(channel.count, channel.mode, channel.gate, channel.rw_mode)

    @property
    def period(self) -> float:
        """Seconds between two terminal counts (the tick period in modes 2 and 3)."""
        return (self.count or 0x10000) / PIT_HZ
