"""Lab 9, wrong: acknowledge() EOIs while the line is still high, then lowers it."""

from pykvm.irqchip.ioapic import RedirectionEntry

# What the checker must say: [(the 1-based step that fails, a phrase its reason contains), ...]; any one.
EXPECTED_FAILURES = [(3, 'remote IRR was still set'), (4, 'after it')]


def route(task) -> None:
    task.guest.ioapic_route(task.pin, RedirectionEntry(vector=task.vector, level_triggered=task.level))


def pulse(task) -> None:
    task.vm.irq_line(task.pin, 1)
    task.vm.irq_line(task.pin, 0)


def acknowledge(task) -> None:
    task.guest.eoi()
    task.vm.irq_line(task.pin, 0)
