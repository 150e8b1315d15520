"""Lab 10, wrong: puts the destination APIC ID in address_hi (the destination field is bits 19:12 of the low half)."""

import time

from pykvm.guests import Command
from pykvm.irqchip import MsiMessage
from pykvm.runtime import command_in_thread

# What the checker must say: [(the 1-based step that fails, a phrase its reason contains), ...]; any one.
EXPECTED_FAILURES = [(1, "the task's destination is APIC ID")]


def msi(destination: int, vector: int) -> MsiMessage:
    return MsiMessage(address_lo=0xFEE00000, address_hi=destination, data=vector)


def wake(task) -> None:
    stats = task.target.vcpu.stats
    with task.vm.irqfd(task.gsi) as irqfd:
        waiter = command_in_thread(task.target, Command.WAIT_LOG, 1)
        deadline = time.monotonic() + 5
        while not stats.read()["blocking"] and time.monotonic() < deadline:
            time.sleep(0.001)
        irqfd.trigger()
        waiter.result(timeout=1)     # the interrupt never comes: no need to wait as long as the reference
