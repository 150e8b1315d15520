"""Lab 7, wrong: raises every NMI up front, before the guest runs."""

from pykvm.guests import Command, StopKind

# What the checker must say: [(the 1-based step that fails, a phrase its reason contains), ...]; any one.
EXPECTED_FAILURES = [(2, 'not inside an NMI handler')]


def nmis(task) -> None:
    guest, vcpu = task.guest, task.guest.vcpu
    for _ in range(task.count):
        vcpu.nmi()
    for _ in range(task.count + 2):
        guest.send(Command.NOP)
        guest.run_until(StopKind.SYNC)
