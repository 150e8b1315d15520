"""Lab 10 step 1 with MsiMessage.compose instead of writing the address and data."""

from pykvm.irqchip import MsiMessage

LAB = 10
EXPECTED_FAILURES = [(1, "let MsiMessage.compose() build the message")]


def send_msi(task) -> None:
    task.vm.signal_msi(MsiMessage.compose(destination=task.destination, vector=task.vector))
