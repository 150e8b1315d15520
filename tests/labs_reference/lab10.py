"""Lab 10 reference solution."""

import time

from pykvm.guests import Command
from pykvm.irqchip import MsiMessage, MsiRoute
from pykvm.runtime import command_in_thread


def msi(destination: int, vector: int) -> MsiMessage:
    return MsiMessage(address_lo=0xFEE00000 | destination << 12, address_hi=0, data=vector)


def send_msi(task) -> None:
    task.vm.signal_msi(msi(task.destination, task.vector))


def route(task) -> None:
    vm = task.vm
    vm.set_gsi_routing(vm.routes + (MsiRoute(task.gsi, msi(task.destination, task.vector)),))


def wake(task) -> None:
    stats = task.target.vcpu.stats
    with task.vm.irqfd(task.gsi) as irqfd:
        waiter = command_in_thread(task.target, Command.WAIT_LOG, 1)
        deadline = time.monotonic() + 5
        while not stats.read()["blocking"]:
            if time.monotonic() > deadline:
                raise TimeoutError("the vCPU never blocked in its hlt")
            time.sleep(0.001)
        irqfd.trigger()
        waiter.result(timeout=5)
