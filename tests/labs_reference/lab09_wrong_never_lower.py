"""Lab 9, wrong: the line is raised but never lowered, by pulse() and by acknowledge()."""


# What the checker must say: [(the 1-based step that fails, a phrase its reason contains), ...]; any one.
EXPECTED_FAILURES = [(2, 'pulse #2'), (3, 'still high')]


def pulse(task) -> None:
    task.vm.irq_line(task.pin, 1)


def acknowledge(task) -> None:
    task.guest.eoi()                   # then the EOI clears remote IRR
