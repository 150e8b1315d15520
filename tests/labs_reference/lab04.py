"""Lab 4 reference solution."""

import pykvm
from pykvm.guests import Command


def inject_when_ready(task) -> None:
    task.guest.command(Command.STI)
    assert task.guest.vcpu.kvm_run.ready_for_interrupt_injection == 1
    task.guest.vcpu.interrupt(task.vector)
    task.guest.command(Command.NOP)


def inject_while_masked(task) -> str:
    task.guest.vcpu.interrupt(task.vector, force=True)
    task.guest.send(Command.NOP)
    stop = task.guest.run()
    if isinstance(stop.exit, pykvm.FailEntryExit):
        return "entry failed"
    return "delivered" if any(r.vector == task.vector for r in task.guest.log()) else "held"
