"""Probes of NMI blocking: nmi_blocking, nmi_window.

Why this exists: a second NMI that arrives while the first one's handler runs
must wait for the handler's IRET; when it is then taken depends on whether the
host asks for an NMI window (or intercepts IRET).
"""

from __future__ import annotations

from ...guests import Command, StopKind
from .base import Expectation, Observation, Outcome, measured, scenario
from .harness import boot, label


class NmiBlocking(Outcome):
    HELD_UNTIL_IRET = "held until IRET"
    NESTED = "nested inside the handler"
    NOT_BLOCKED = "not blocked"


class NmiWindow(Outcome):
    AFTER_IRET = "delivered right after IRET"
    NEXT_ENTRY = "held until the next VM entry"


NMI_BLOCKING = Expectation(
    "nmi_blocking", "a second NMI while the first NMI's handler runs", NmiBlocking.HELD_UNTIL_IRET,
    "Intel SDM Vol. 3A 6.7.1 'Handling Multiple NMIs'",
    measured(NmiBlocking.HELD_UNTIL_IRET, NmiBlocking.HELD_UNTIL_IRET, NmiBlocking.HELD_UNTIL_IRET))

NMI_WINDOW = Expectation(
    "nmi_window", "when a held NMI is taken after the handler's IRET", NmiWindow.AFTER_IRET,
    "x86.c inject_pending_event / enable_nmi_window (NMI-window exiting, or IRET interception "
    "on SVM)",
    measured(NmiWindow.NEXT_ENTRY, NmiWindow.AFTER_IRET, NmiWindow.AFTER_IRET),
    {NmiWindow.NEXT_ENTRY: "no NMI-window exit: the NMI waits (unmasked) until the next KVM_RUN"},
    "nmi_delivered_at_iret")


@scenario(NMI_BLOCKING, NMI_WINDOW)
def nmi_blocking(kvm) -> tuple[Observation, Observation]:
    """An NMI; a second NMI while the first handler runs; where the second is taken."""
    vm, guest = boot(kvm, notify=True)
    with vm:
        vcpu = guest.vcpu
        vcpu.nmi()
        guest.send(Command.NOP)
        stop = guest.run_until(StopKind.VECTOR)
        handler = range(guest.address("handler_common"), guest.address("handler_iret") + 1)
        masked = vcpu.events.nmi.masked
        vcpu.nmi()
        pending = vcpu.events.nmi.pending
        guest.run_until(StopKind.SYNC)
        log = guest.log()
        if len(log) > 1 and log[1].rip in handler:
            blocking = Observation(NmiBlocking.NESTED, f"{log[1]!r}")
        elif stop.rip in handler and masked and pending:
            blocking = Observation(NmiBlocking.HELD_UNTIL_IRET,
                                   "in the handler: NMI masked, second NMI pending")
        else:
            blocking = Observation(NmiBlocking.NOT_BLOCKED, f"masked={masked} pending={pending}")
        if len(log) > 1:
            window = Observation(NmiWindow.AFTER_IRET, f"second NMI taken at {label(guest, log[1].rip)} "
                                                       f"before the next exit")
        else:
            guest.command(Command.NOP)
            taken = guest.log()[1:]
            window = Observation(NmiWindow.NEXT_ENTRY,
                                 "no NMI-window exit; after the IRET the NMI stayed pending, "
                                 f"taken at {label(guest, taken[0].rip) if taken else 'no point'} "
                                 "after the next KVM_RUN")
        return blocking, window
