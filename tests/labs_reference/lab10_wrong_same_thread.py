"""Lab 10, wrong: writes the irqfd on the vCPU's own thread before the vCPU halts, then runs WAIT_LOG."""

from pykvm.guests import Command
from pykvm.irqchip import MsiMessage, MsiRoute

# What the checker must say: [(the 1-based step that fails, a phrase its reason contains), ...]; any one.
EXPECTED_FAILURES = [(3, "on the thread that runs vCPU")]


def msi(destination: int, vector: int) -> MsiMessage:
    return MsiMessage(address_lo=0xFEE00000 | destination << 12, address_hi=0, data=vector)


def send_msi(task) -> None:
    task.vm.signal_msi(msi(task.destination, task.vector))


def route(task) -> None:
    vm = task.vm
    vm.set_gsi_routing(vm.routes + (MsiRoute(task.gsi, msi(task.destination, task.vector)),))


def wake(task) -> None:
    with task.vm.irqfd(task.gsi) as irqfd:
        irqfd.trigger()                                   # pending before anything waits for it
        task.target.command(Command.WAIT_LOG, 1)          # returns at once: the log already holds it
