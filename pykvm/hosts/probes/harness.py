"""What the probe scenarios share: booting a guest, single-stepping it, reading what it logged.

Why this exists: every scenario boots a packaged guest on a fresh VM, many
single-step it to a label, and most ask where a vector was taken. Reading the
log never assumes how many records it holds: a host that differs may log a
vector twice, or a #DB from a trap flag left in a saved RFLAGS, and the probe
must then report what it saw, not crash.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from ... import guests
from ...core.constants import Cap
from ...core.errors import GuestError
from ...core.exits import DebugExit, InternalErrorExit
from ...guests import Command, GuestSession, GuestStop, LogRecord, StopKind
from ...x86.vectors import vector_name
from .base import Observation, ProbeOutcome

PROBE_VECTOR = 0x40
MSI_VECTOR = 0x45
SOFTWARE_VECTOR = 0x33
MAX_STEPS = 64          # single-steps allowed to reach a label inside one command
TRIALS = 5              # runs of a probe whose outcome an asynchronous host exit could change


def boot(kvm, mode: str = "long", irqchip: str = "none", notify: bool = False):
    """A fresh VM with one booted vCPU: (vm, session). The caller closes the VM.

    The session has no explainer: the probes measure the host's limits, so an exit is
    reported as KVM gave it, never explained with the facts being measured.
    """
    vm = kvm.create_vm(irqchip=irqchip)
    try:
        [session] = guests.boot_cpus(vm, mode, 1, notify=notify)
        return vm, session
    except BaseException:
        vm.close()
        raise


def lapic_session(kvm, stepping: bool = False):
    """A VM with the in-kernel irqchip and an enabled xAPIC; ``stepping``: the host must single-step.

    Raises CapabilityMissing when the host lacks either.
    """
    kvm.require(Cap.IRQCHIP, "the in-kernel LAPIC probes")
    if stepping:
        kvm.require(Cap.SET_GUEST_DEBUG, "single-stepping")
    vm, guest = boot(kvm, irqchip="kernel")
    try:
        guest.apic_enable(auto_eoi=True)
    except BaseException:
        vm.close()
        raise
    return vm, guest


def run_once(session: GuestSession) -> GuestStop:
    """``session.run()``; a KVM_EXIT_INTERNAL_ERROR raises GuestError carrying it (the runner reports it)."""
    stop = session.run()
    if isinstance(stop.exit, InternalErrorExit):
        raise GuestError(stop.exit.explanation or repr(stop.exit), stop.exit)
    return stop


def label(session: GuestSession, rip: int) -> str:
    """The image label at ``rip``, else the address."""
    for name, address in session.image.symbols.items():
        if address == rip and not name.startswith(("cmd_", "do_")):
            return name
    return f"{rip:#x}"


def step(session: GuestSession) -> int:
    """One single-step; the RIP it stopped at. Any other exit raises GuestError carrying it."""
    exit = session.vcpu.run()
    if not isinstance(exit, DebugExit):
        raise GuestError(f"a single-step ended in {exit!r}", exit)
    return session.vcpu.regs.rip


def step_to(session: GuestSession, target: str) -> list[int]:
    """Single-step until RIP is at label ``target``; returns the RIPs of the debug exits."""
    address, rips = session.address(target), []
    for _ in range(MAX_STEPS):
        exit = session.vcpu.run()
        if not isinstance(exit, DebugExit):
            raise GuestError(f"single-stepping towards {target}: got {exit!r}", exit)
        rips.append(session.vcpu.regs.rip)
        if rips[-1] == address:
            return rips
    raise GuestError(f"{MAX_STEPS} single-steps did not reach {target}")


def start_stepping(session: GuestSession, command: Command, target: str, arg: int = 0) -> list[int]:
    """Send ``command`` and single-step it until RIP is at label ``target``; the RIPs stepped."""
    session.send(command, arg)
    session.vcpu.set_single_step(True)
    return step_to(session, target)


def stop_stepping(session: GuestSession) -> None:
    """Stop single-stepping and let the command run on to its sync point."""
    session.vcpu.set_single_step(False)
    session.run_until(StopKind.SYNC)


def internal_error(error: GuestError) -> InternalErrorExit | None:
    """The KVM_EXIT_INTERNAL_ERROR behind ``error``, if that is what stopped the guest."""
    return error.exit if isinstance(error.exit, InternalErrorExit) else None


def where_taken(log: list[LogRecord], vector: int, places: Mapping[int, ProbeOutcome], elsewhere: ProbeOutcome,
                not_taken: ProbeOutcome, name: Callable[[int], str]) -> Observation:
    """Where the first record of ``vector`` in ``log`` interrupted the guest, as an outcome of ``places``.

    ``name`` labels an address. Other records (a vector taken twice, a #DB from a
    stale trap flag) go into the detail, as evidence.
    """
    taken = next((record for record in log if record.vector == vector), None)
    others = [record for record in log if record is not taken]
    extra = ""
    if others:
        names = [vector_name(record.vector) for record in others]
        counted = sorted(set(names), key=names.index)
        extra = f"; also logged: {', '.join(f'{n} x{names.count(n)}' for n in counted)}"
    if taken is None:
        return Observation(not_taken, f"{vector_name(vector)} was never logged{extra}")
    return Observation(places.get(taken.rip, elsewhere), f"taken at {name(taken.rip)}{extra}")


def taken(session: GuestSession, vector: int, places: Mapping[str, ProbeOutcome], elsewhere: ProbeOutcome,
          not_taken: ProbeOutcome) -> Observation:
    """:func:`where_taken` in ``session``'s log, ``places`` keyed by image label."""
    return where_taken(session.log(), vector, {session.address(name): outcome for name, outcome in places.items()},
                       elsewhere, not_taken, lambda rip: label(session, rip))


def most_common(trial: Callable[[], Observation]) -> Observation:
    """Run ``trial`` TRIALS times; the most frequent outcome, with the spread in the detail.

    For probes that race with the host: on a host that delivers only at VM entries, an
    unrelated exit (a host timer, say) landing inside `sti; nop` changes where a vector is
    taken. The doctor reports what the host usually does and says when it varied.
    """
    results = [trial() for _ in range(TRIALS)]
    outcomes = [result.outcome for result in results]
    best = max(set(outcomes), key=outcomes.count)
    chosen = next(result for result in results if result.outcome == best)
    spread = "" if outcomes.count(best) == TRIALS else (
        f" [{outcomes.count(best)} of {TRIALS} trials; others: "
        f"{', '.join(sorted({str(o) for o in outcomes if o != best}))}]")
    return Observation(best, chosen.detail + spread)
