"""Lab 5: "write your own" controller, as a bare subclass of pykvm's."""

from pykvm.irqchip import UserspaceIrqController

LAB = 5
EXPECTED_FAILURES = [(1, "inherits) pykvm's own UserspaceIrqController")]


class Mine(UserspaceIrqController):
    pass


def Controller(vcpu):
    return Mine(vcpu)
