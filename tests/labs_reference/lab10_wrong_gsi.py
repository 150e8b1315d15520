"""Lab 10, wrong: routes (and puts the irqfd on) the vector's number instead of the task's GSI."""

import time

from pykvm.guests import Command
from pykvm.irqchip import MsiRoute
from pykvm.runtime import command_in_thread

# What the checker must say: [(the 1-based step that fails, a phrase its reason contains), ...]; any one.
EXPECTED_FAILURES = [(2, "has no route")]


def route(task) -> None:
    vm = task.vm
    vm.set_gsi_routing(vm.routes + (MsiRoute(task.vector, msi(task.destination, task.vector)),))


def wake(task) -> None:
    stats = task.target.vcpu.stats
    with task.vm.irqfd(task.vector) as irqfd:
        waiter = command_in_thread(task.target, Command.WAIT_LOG, 1)
        deadline = time.monotonic() + 5
        while not stats.read()["blocking"] and time.monotonic() < deadline:
            time.sleep(0.001)
        irqfd.trigger()
        waiter.result(timeout=1)     # the interrupt never comes: no need to wait as long as the reference
