"""Lab 12, wrong: writes the divisor itself into TIMER_DIVIDE instead of its encoding."""


from pykvm.irqchip.lapic import ApicReg, TimerMode

# What the checker must say: [(the 1-based step that fails, a phrase its reason contains), ...]; any one.
EXPECTED_FAILURES = [(2, "median gap")]


def periodic(task) -> None:
    guest = task.guest
    guest.apic_write(ApicReg.TIMER_DIVIDE, task.divide)
    guest.apic_write(ApicReg.LVT_TIMER, task.vector | int(TimerMode.PERIODIC) << 17)
    guest.apic_write(ApicReg.TIMER_INITIAL, task.period_ns // task.divide)
