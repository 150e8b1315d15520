"""Lab 4 step 3: answer "held" without injecting: what KVM did then is indeed "held"."""

from pykvm.guests import Command

LAB = 4
EXPECTED_FAILURES = [(3, "KVM's own counters disagree")]


def inject_when_ready(task) -> None:
    guest = task.guest
    guest.command(Command.STI)
    guest.vcpu.interrupt(task.vector)
    guest.command(Command.NOP)


def inject_while_masked(task) -> str:
    return "held"
