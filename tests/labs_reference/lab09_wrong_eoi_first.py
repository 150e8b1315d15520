"""Lab 9, wrong: acknowledge() EOIs while the line is still high, then lowers it."""


# What the checker must say: [(the 1-based step that fails, a phrase its reason contains), ...]; any one.
EXPECTED_FAILURES = [(3, 'remote IRR was still set'), (4, 'after it')]


def acknowledge(task) -> None:
    task.guest.eoi()
    task.vm.irq_line(task.pin, 0)
