"""Lab 12, wrong: programs a periodic timer where a one-shot was asked."""


from pykvm.irqchip.lapic import TimerMode

# What the checker must say: [(the 1-based step that fails, a phrase its reason contains), ...]; any one.
EXPECTED_FAILURES = [(3, "once")]


def one_shot(task) -> None:
    start_lapic_timer(task, TimerMode.PERIODIC)
