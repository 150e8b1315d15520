"""Lab 13, wrong: uses the self shorthand where one other CPU was asked."""

from pykvm.irqchip.lapic import DestinationShorthand

# What the checker must say: [(the 1-based step that fails, a phrase its reason contains), ...]; any one.
EXPECTED_FAILURES = [(3, "CPU 0 took")]

reference_send_ipi = send_ipi                 # the reference's, before this file replaces it


def send_ipi(task, ipi) -> None:
    if ipi.kind == "one":
        task.bsp.send_ipi(ipi.vector, shorthand=DestinationShorthand.SELF)
    else:
        reference_send_ipi(task, ipi)
