"""Lab 9, wrong: acknowledge() lowers the line but never EOIs."""

from pykvm.irqchip.ioapic import RedirectionEntry

# What the checker must say: [(the 1-based step that fails, a phrase its reason contains), ...]; any one.
EXPECTED_FAILURES = [(3, 'remote IRR was still set')]


def route(task) -> None:
    task.guest.ioapic_route(task.pin, RedirectionEntry(vector=task.vector, level_triggered=task.level))


def pulse(task) -> None:
    task.vm.irq_line(task.pin, 1)
    task.vm.irq_line(task.pin, 0)


def acknowledge(task) -> None:
    task.vm.irq_line(task.pin, 0)      # the device is serviced: its line goes low first
