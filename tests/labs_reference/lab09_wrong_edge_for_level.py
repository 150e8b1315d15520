"""Lab 9, wrong: every pin is routed edge-triggered, the level device too."""

from pykvm.irqchip.ioapic import RedirectionEntry

# What the checker must say: [(the 1-based step that fails, a phrase its reason contains), ...]; any one.
EXPECTED_FAILURES = [(1, 'trigger mode edge, not level')]


def route(task) -> None:
    task.guest.ioapic_route(task.pin, RedirectionEntry(vector=task.vector, level_triggered=False))
