"""Lab 4 reference solution."""

import pykvm
from pykvm.guests import Command
from pykvm.injection import Injector


def inject_when_ready(task) -> None:
    task.guest.command(Command.STI)
    assert task.guest.vcpu.kvm_run.ready_for_interrupt_injection == 1
    Injector(task.guest.vcpu).interrupt(task.vector)   # refused unless the exit said ready
    task.guest.command(Command.NOP)


def inject_while_masked(task) -> str:
    task.guest.vcpu.interrupt(task.vector)           # the bare KVM_INTERRUPT, while IF=0
    task.guest.send(Command.NOP)
    stop = task.guest.run()
    if isinstance(stop.exit, pykvm.FailEntryExit):
        return "entry failed"
    return "delivered" if any(r.vector == task.vector for r in task.guest.log()) else "held"
