"""Lab 10: MSI, GSI routing and irqfd.

Read sheet.md first; fill in the TODOs; check with `python lab.py` in this folder.
"""

import time  # noqa: F401

from pykvm.guests import Command  # noqa: F401
from pykvm.irqchip import MsiMessage, MsiRoute  # noqa: F401
from pykvm.runtime import command_in_thread  # noqa: F401


def msi(destination: int, vector: int) -> MsiMessage:
    """A fixed, physical-destination MSI for APIC ID `destination` and `vector`, built from its bits."""
    address = 0        # TODO: the interrupt message range, with the destination in bits 19:12
    data = 0           # TODO: the vector in bits 7:0 (delivery mode 0 = fixed)
    raise NotImplementedError("TODO: msi() (sheet.md, step 1)")
    return MsiMessage(address_lo=address, address_hi=0, data=data)


def send_msi(task) -> None:
    """Send msi(task.destination, task.vector) with KVM_SIGNAL_MSI."""
    print("task:", task)
    task.vm.signal_msi(msi(task.destination, task.vector))


def route(task) -> None:
    """Route GSI task.gsi to msi(task.destination, task.vector), keeping the routes the VM has."""
    raise NotImplementedError("TODO: route() (sheet.md, step 2)")


def wake(task) -> None:
    """Halt task.target inside KVM_RUN on its own thread, then wake it with an irqfd on task.gsi from here."""
    # TODO (sheet.md, step 3): with task.vm.irqfd(task.gsi) as irqfd:
    #   stats = task.target.vcpu.stats                      (before the thread: it needs the vCPU)
    #   waiter = command_in_thread(task.target, Command.WAIT_LOG, 1)
    #   wait (with a deadline) until stats.read()["blocking"] is 1, then irqfd.trigger()
    #   waiter.result(timeout=5)
    raise NotImplementedError("TODO: wake() (sheet.md, step 3)")


if __name__ == "__main__":
    from pykvm.labs.runner import check_here

    check_here(10, __file__)
