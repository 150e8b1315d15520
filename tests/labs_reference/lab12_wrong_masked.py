"""Lab 12, wrong: leaves the mask bit of the LVT timer entry set."""


from pykvm.irqchip.lapic import ApicReg, TimerMode

# What the checker must say: [(the 1-based step that fails, a phrase its reason contains), ...]; any one.
EXPECTED_FAILURES = [(1, "masked")]


def periodic(task) -> None:
    guest = task.guest
    guest.apic_write(ApicReg.TIMER_DIVIDE, DIVIDE_ENCODING[task.divide])
    guest.apic_write(ApicReg.LVT_TIMER, task.vector | int(TimerMode.PERIODIC) << 17 | 1 << 16)
    guest.apic_write(ApicReg.TIMER_INITIAL, task.period_ns // task.divide)
