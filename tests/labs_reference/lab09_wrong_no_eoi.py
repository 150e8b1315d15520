"""Lab 9, wrong: acknowledge() lowers the line but never EOIs."""


# What the checker must say: [(the 1-based step that fails, a phrase its reason contains), ...]; any one.
EXPECTED_FAILURES = [(3, 'remote IRR was still set')]


def acknowledge(task) -> None:
    task.vm.irq_line(task.pin, 0)      # the device is serviced: its line goes low first
