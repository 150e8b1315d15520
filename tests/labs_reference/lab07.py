"""Lab 7 reference solution."""

from pykvm.guests import Command, StopKind


def nmis(task) -> None:
    guest, vcpu = task.guest, task.guest.vcpu
    vcpu.nmi()
    raised = 1
    guest.send(Command.NOP)
    for _ in range(100):
        if sum(r.vector == 2 for r in guest.log()) >= task.count:
            break
        stop = guest.run_until(StopKind.VECTOR, StopKind.SYNC)
        if stop.kind == StopKind.VECTOR and stop.value == 2 and raised < task.count:
            assert vcpu.events.nmi.masked
            vcpu.nmi()
            raised += 1
        elif stop.kind == StopKind.SYNC:
            guest.send(Command.NOP)
    guest.run_until(StopKind.SYNC)
