"""Lab 7: raise each NMI outside the handler (one at a time, each taken), then rewrite the trace's RIPs."""

from pykvm.guests import Command
from pykvm.labs.framework import TRACE
from pykvm.labs.guest_task import handler_range

LAB = 7
EXPECTED_FAILURES = [(2, "outside the NMI handler")]


def nmis(task) -> None:
    guest = task.guest
    for _ in range(task.count):
        guest.vcpu.nmi()
        guest.command(Command.NOP)
    inside = handler_range(guest).start
    for record in TRACE.injections:
        record.rip = inside
