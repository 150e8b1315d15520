"""Lab 13, wrong: uses the self shorthand where one other CPU was asked."""

import lab13
from lab13 import send_init, send_startup  # noqa: F401

from pykvm.irqchip.lapic import DestinationShorthand

# What the checker must say: [(the 1-based step that fails, a phrase its reason contains), ...]; any one.
EXPECTED_FAILURES = [(3, "CPU 0 took")]


def send_ipi(task, ipi) -> None:
    if ipi.kind == "one":
        task.bsp.send_ipi(ipi.vector, shorthand=DestinationShorthand.SELF)
    else:
        lab13.send_ipi(task, ipi)
