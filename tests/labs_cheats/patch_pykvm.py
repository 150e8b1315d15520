"""Lab 7: patch pykvm so the guest's log shows task.count NMIs and the trace holds the injections, with no NMI."""

from pykvm.guests import GuestSession, LogRecord
from pykvm.labs.framework import TRACE, InjectionRecord
from pykvm.labs.guest_task import handler_range

LAB = 7
EXPECTED_FAILURES = [(1, "KVM's own counters disagree")]


def nmis(task) -> None:
    guest = task.guest
    inside = handler_range(guest).start
    rflags = 0x202 if task.interrupts_enabled else 0x2
    fake = [LogRecord(seq, 2, 0x8, None, inside + 0x1000, rflags, 0, None, 0, 0, False) for seq in range(task.count)]
    GuestSession.log = lambda self: fake
    TRACE.injections[:] = [InjectionRecord(0, "nmi", 2, False, 1, 0, 0, -1)] + [
        InjectionRecord(0, "nmi", 2, False, 1, 0, 0, inside) for _ in range(task.count - 1)]
