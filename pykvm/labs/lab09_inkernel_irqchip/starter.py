"""Lab 9: the in-kernel irqchip. Read sheet.md first; fill in the TODOs; check with `python lab.py` in this folder.

The checker calls route(task), pulse(task) and acknowledge(task) with a
long-mode guest on a VM whose PICs, IOAPIC and LAPIC live in KVM
(irqchip="kernel"); task.guest and task.vm belong to the checker.
task.pin: the IOAPIC pin (= GSI); task.vector; task.level: level- or edge-triggered.
"""

from pykvm.irqchip import ioapic  # noqa: F401  (ioapic.read(vm), ioapic.write(vm, state))
from pykvm.irqchip.ioapic import RedirectionEntry  # noqa: F401


def route(task) -> None:
    """Program IOAPIC pin task.pin: task.vector, fixed delivery to APIC ID 0, trigger mode per task.level."""
    print("route:", task)
    # TODO: build a RedirectionEntry and have the guest write it (task.guest.ioapic_route(pin, entry)),
    #       or write it from the host (ioapic.read(task.vm).with_entry(pin, entry), then ioapic.write).
    raise NotImplementedError("TODO in route(): program the redirection entry (sheet.md, Steps)")


def pulse(task) -> None:
    """One edge on task.pin (edge-triggered): the guest must take task.vector once per call."""
    # TODO: KVM_IRQ_LINE is task.vm.irq_line(gsi, level).
    raise NotImplementedError("TODO in pulse(): one edge on the line (sheet.md, Steps)")


def acknowledge(task) -> None:
    """The guest took task.vector from the level-triggered device on task.pin: finish the request."""
    # TODO: the device has been serviced (its line); the guest is done with the vector (task.guest.eoi()).
    raise NotImplementedError("TODO in acknowledge(): end the level request (sheet.md, Steps)")


if __name__ == "__main__":
    from pykvm.labs.runner import check_here

    check_here(9, __file__)
