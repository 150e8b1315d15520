"""Lab 9 reference solution."""

from pykvm.irqchip.ioapic import RedirectionEntry


def route(task) -> None:
    task.guest.ioapic_route(task.pin, RedirectionEntry(vector=task.vector, level_triggered=task.level))


def pulse(task) -> None:
    task.vm.irq_line(task.pin, 1)
    task.vm.irq_line(task.pin, 0)


def acknowledge(task) -> None:
    task.vm.irq_line(task.pin, 0)      # the device is serviced: its line goes low first
    task.guest.eoi()                   # then the EOI clears remote IRR
