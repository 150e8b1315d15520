"""Probes of NMI blocking, per CPU mode: nmi_blocking, nmi_window (and nmi_blocking_real, ...).

Why this exists: a second NMI that arrives while the first one's handler runs
must wait for the handler's IRET; when it is then taken depends on whether the
host asks for an NMI window (or intercepts IRET). Whether the CPU blocks NMIs
at all depends on how KVM delivered the first: kvm_intel without unrestricted
guest runs real mode in vm86 and delivers events there through its instruction
emulator, so no NMI blocking is set, KVM reports NMIs unmasked in the handler
and nests the second one (measured under Bochs with ``ept=0
unrestricted_guest=0``).
"""

from __future__ import annotations

import contextlib
import functools

from ...core.constants import Cap
from ...guests import Command, StopKind
from .base import Expectation, Observation, ProbeOutcome, Result, in_mode, measured, mode_note, scenario
from .harness import TRIALS, boot, label


class NmiBlocking(ProbeOutcome):
    HELD_UNTIL_IRET = "held until IRET"
    NESTED = "unmasked in the handler: nested"
    NOT_BLOCKED = "not blocked"


class NmiWindow(ProbeOutcome):
    AFTER_IRET = "delivered right after IRET"
    NEXT_ENTRY = "held until the next VM entry"
    NOT_HELD = "not held (taken inside the handler)"
    UNDECIDED = "undecided (an exit KVM handled in the kernel came first in every trial)"


NMI_BLOCKING_SOURCE = "Intel SDM Vol. 3A 6.7.1 'Handling Multiple NMIs'"
NMI_BLOCKING_EXPLANATIONS: dict[ProbeOutcome, str] = {
    NmiBlocking.NESTED: "KVM reports NMIs unmasked inside the NMI handler (events nmi.masked=0) and injects "
                        "a second NMI there: kvm_intel without unrestricted guest delivers a real-mode NMI "
                        "through its instruction emulator, so the CPU's NMI blocking is never set"}
NMI_WINDOW_SOURCE = ("x86.c inject_pending_event / enable_nmi_window (NMI-window exiting, or IRET "
                     "interception on SVM)")
NMI_WINDOW_EXPLANATIONS: dict[ProbeOutcome, str] = {
    NmiWindow.NEXT_ENTRY: "no NMI-window exit: the NMI waits (unmasked) until the next KVM_RUN",
    NmiWindow.NOT_HELD: "the second NMI was not held for the IRET (nmi_blocking says how)"}
# What each vendor module did, per mode: ((blocking, window) on kvm_pvm, kvm_amd, kvm_intel).
NmiPair = tuple[ProbeOutcome, ProbeOutcome]         # (nmi_blocking, nmi_window)
NMI_RECORDS: dict[str, tuple[NmiPair, NmiPair, NmiPair]] = {
    "real": ((NmiBlocking.HELD_UNTIL_IRET, NmiWindow.NEXT_ENTRY),
             (NmiBlocking.HELD_UNTIL_IRET, NmiWindow.AFTER_IRET),
             (NmiBlocking.HELD_UNTIL_IRET, NmiWindow.AFTER_IRET)),
    "protected": ((Result.INTERNAL_ERROR, Result.INTERNAL_ERROR),
                  (NmiBlocking.HELD_UNTIL_IRET, NmiWindow.AFTER_IRET),
                  (NmiBlocking.HELD_UNTIL_IRET, NmiWindow.AFTER_IRET)),
    "long": ((NmiBlocking.HELD_UNTIL_IRET, NmiWindow.NEXT_ENTRY),
             (NmiBlocking.HELD_UNTIL_IRET, NmiWindow.AFTER_IRET),
             (NmiBlocking.HELD_UNTIL_IRET, NmiWindow.AFTER_IRET)),
}


def held_nmi_outcome(returned_to: int, taken_at: int | None, in_handler: bool, window_exits: int,
                     in_kernel_exits: int) -> NmiWindow | None:
    """Where a second NMI, held while the first one's handler ran, was taken: the outcome, or None if the trial
    cannot tell.

    ``returned_to`` is the handler IRET's return point; ``taken_at`` where the second NMI was taken before the
    guest's next exit to userspace (None: not by then); the counts are KVM's during that run. An NMI delivered
    right after the IRET is taken at its return point, whether KVM asked for the window (an NMI-window exit, or
    SVM's IRET interception) or the CPU delivered it itself (virtual NMIs). Taken anywhere later, it waited for
    a VM entry: the one after an exit KVM handled in the kernel (a host interrupt, a preemption). Such an exit
    can come at the return point too (kvm_pvm under CPU load, 1 trial in 1500), so an NMI taken there with no
    NMI-window exit but an exit handled in the kernel could be either.
    """
    if in_handler:
        return NmiWindow.NOT_HELD
    if taken_at is None or taken_at != returned_to:
        return NmiWindow.NEXT_ENTRY
    if window_exits == 0 and in_kernel_exits > 0:
        return None
    return NmiWindow.AFTER_IRET


def nmi_blocking(kvm, mode: str) -> tuple[Observation, Observation]:
    """An NMI; a second NMI while the first handler runs; where the second is taken.

    A trial :func:`held_nmi_outcome` cannot tell is set aside and another made, up to TRIALS in all.
    """
    counted = kvm.check_extension(Cap.BINARY_STATS_FD)
    set_aside = 0
    while True:
        blocking, window = _nmi_trial(kvm, mode, counted)
        if window is not None or set_aside + 1 == TRIALS:
            break
        set_aside += 1
    if window is None:
        window = Observation(NmiWindow.UNDECIDED, f"each of {TRIALS} trials took the NMI at the IRET's return "
                                                  f"point with an exit KVM handled in the kernel before it")
    elif set_aside:
        window = Observation(window.outcome, window.detail + f" [{set_aside} earlier trial(s) set aside: an exit "
                                                             f"KVM handled in the kernel came first]")
    return blocking, window


def _nmi_trial(kvm, mode: str, counted: bool) -> tuple[Observation, Observation | None]:
    """One trial of :func:`nmi_blocking`: its two observations (the second None when it cannot tell)."""
    vm, guest = boot(kvm, mode, notify=True)
    with vm:
        vcpu = guest.vcpu
        vcpu.nmi()
        guest.send(Command.NOP)
        stop = guest.run_until(StopKind.VECTOR)
        handler = range(guest.address("handler_common"), guest.address("handler_iret") + 1)
        masked = vcpu.events.nmi.masked
        vcpu.nmi()
        pending = vcpu.events.nmi.pending
        before = vcpu.exit_sequence
        with contextlib.ExitStack() as stack:
            delta = stack.enter_context(vcpu.stats.delta("exits", "nmi_window_exits")) if counted else None
            guest.run_until(StopKind.SYNC)
        log = guest.log()
        # the exits KVM handled itself during that run: all it counted, less those that came to userspace
        in_kernel = delta["exits"] - (vcpu.exit_sequence - before) if delta is not None else 0
        window_exits = delta["nmi_window_exits"] if delta is not None else 0
        seen = (f"in the handler at {label(guest, stop.rip)}: nmi.masked={masked}, after the second KVM_NMI "
                f"nmi.pending={pending}")
        nested = len(log) > 1 and log[1].rip in handler
        if nested and not masked:
            blocking = Observation(NmiBlocking.NESTED, f"{seen}; second {log[1]!r}")
        elif stop.rip in handler and masked and pending and not nested:
            blocking = Observation(NmiBlocking.HELD_UNTIL_IRET, seen)
        else:
            blocking = Observation(NmiBlocking.NOT_BLOCKED, f"{seen}; log {log!r}")
        taken_at = log[1].rip if len(log) > 1 else None
        outcome = held_nmi_outcome(log[0].rip, taken_at, nested, window_exits, in_kernel)
        counters = (f"KVM counted {window_exits} NMI-window exit(s) and {in_kernel} exit(s) it handled in the "
                    f"kernel" if delta is not None else "this KVM gives no statistics to count its exits")
        if outcome is None:
            return blocking, None
        if taken_at is not None:
            return blocking, Observation(outcome, f"second NMI taken at {label(guest, taken_at)} before the "
                                                  f"next exit to userspace (the IRET returned to "
                                                  f"{label(guest, log[0].rip)}); {counters}")
        guest.command(Command.NOP)
        taken = guest.log()[1:]
        return blocking, Observation(outcome, "after the IRET the NMI stayed pending, taken at "
                                              f"{label(guest, taken[0].rip) if taken else 'no point'} after the "
                                              f"next KVM_RUN; {counters}")


def _register(mode: str) -> None:
    """The two rows of ``mode`` and the scenario that measures both."""
    pvm, amd, intel = NMI_RECORDS[mode]
    hosts = [measured(pvm[i], amd[i], intel[i], intel_note=mode_note(mode), amd_note=mode_note(mode))
             for i in range(2)]
    blocking = Expectation(in_mode("nmi_blocking", mode), f"a second NMI while the first NMI's handler runs, "
                                                          f"{mode} mode", NmiBlocking.HELD_UNTIL_IRET,
                           NMI_BLOCKING_SOURCE, hosts[0], NMI_BLOCKING_EXPLANATIONS,
                           in_mode("nmi_blocked_until_iret", mode))
    window = Expectation(in_mode("nmi_window", mode), f"when a held NMI is taken after the handler's IRET, "
                                                      f"{mode} mode", NmiWindow.AFTER_IRET, NMI_WINDOW_SOURCE,
                         hosts[1], NMI_WINDOW_EXPLANATIONS, in_mode("nmi_delivered_at_iret", mode))
    scenario(blocking, window)(functools.partial(nmi_blocking, mode=mode))


for _mode in NMI_RECORDS:
    _register(_mode)
