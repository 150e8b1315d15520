"""Small guest scenarios that measure how this host's KVM delivers events.

Why this exists: hosts legitimately differ (measured: :mod:`pykvm.hosts.conformance`) in when
the interrupt window opens, where RIP points at an IO exit, which shadows they
honour, and what their instruction emulator can run. ``python -m pykvm.doctor``
runs every scenario here through pykvm itself and compares each outcome with
the expectation in :mod:`pykvm.hosts.conformance`, so a test author can tell "KVM is
broken" from "this host differs".

Each scenario boots a packaged guest on a fresh VM and returns one or more
:class:`Observation` records keyed by probe name (the keys of
``conformance.EXPECTATIONS``). An outcome is a short phrase from a fixed
vocabulary, so that it can be compared with the table; ``detail`` says what
was seen. A scenario whose host lacks what it needs reports ``outcome=None``.
"""

from __future__ import annotations

from typing import Callable, Dict

from .. import guests
from ..core.constants import Cap
from ..core.errors import CapabilityMissing, GuestError, HostLimitation
from ..core.exits import DebugExit, FailEntryExit, HltExit, ShutdownExit
from ..core.state import record
from ..guests import Command, GuestSession, StopKind
from ..irqchip import lapic

PROBE_VECTOR = 0x40
MSI_VECTOR = 0x45
SOFTWARE_VECTOR = 0x33
MAX_STEPS = 64          # single-steps allowed to reach a label inside one command
TRIALS = 5              # runs of a probe whose outcome an asynchronous host exit could change


@record
class Observation:
    """What one probe saw: ``outcome`` (a phrase of the conformance table, None if unsupported)."""

    outcome: str | None
    detail: str


Scenario = Callable[[object], Dict[str, Observation]]
# Each scenario with the probes it reports.
SCENARIOS: list[tuple[Scenario, tuple[str, ...]]] = []


def scenario(*probes: str) -> Callable[[Scenario], Scenario]:
    """Register a scenario reporting ``probes``; a host capability it lacks makes them unsupported."""
    def register(function: Scenario) -> Scenario:
        SCENARIOS.append((function, probes))
        return function
    return register


def _boot(kvm, mode: str = "long", irqchip: str = "none", notify: bool = False):
    """A fresh VM with one booted vCPU: (vm, session). The caller closes the VM."""
    vm = kvm.create_vm(irqchip=irqchip)
    try:
        [session] = guests.boot_cpus(vm, mode, 1, notify=notify)
        return vm, session
    except BaseException:
        vm.close()
        raise


def _label(session: GuestSession, rip: int) -> str:
    """The image label at ``rip``, else the address."""
    for name, address in session.image.symbols.items():
        if address == rip and not name.startswith(("cmd_", "do_")):
            return name
    return f"{rip:#x}"


def _step_to(session: GuestSession, label: str) -> list[int]:
    """Single-step until RIP is at ``label``; returns the RIPs of the debug exits."""
    vcpu, target, rips = session.vcpu, session.address(label), []
    for _ in range(MAX_STEPS):
        exit = vcpu.run()
        if not isinstance(exit, DebugExit):
            raise GuestError(f"single-stepping towards {label}: got {exit!r}")
        rips.append(vcpu.regs.rip)
        if rips[-1] == target:
            return rips
    raise GuestError(f"{MAX_STEPS} single-steps did not reach {label}")


def _most_common(trial: Callable[[], Observation]) -> Observation:
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


@scenario("io_exit_rip")
def io_exit_rip(kvm) -> dict[str, Observation]:
    """Where RIP points when KVM reports the guest's sync `out` as KVM_EXIT_IO."""
    vm, guest = _boot(kvm)
    with vm:
        stop = guest.command(Command.NOP)
        places = {guest.address("sync_out"): "at the out", guest.address("sync_done"): "past the out"}
        return {"io_exit_rip": Observation(places.get(stop.rip, "elsewhere"),
                                           f"RIP {stop.rip:#x} ({_label(guest, stop.rip)})")}


@scenario("irq_window")
def irq_window(kvm) -> dict[str, Observation]:
    """request_interrupt_window while IF=0, then the guest runs `sti; nop; out`."""
    def trial() -> Observation:
        vm, guest = _boot(kvm)
        with vm:
            guest.command(Command.CLI)
            guest.vcpu.kvm_run.request_interrupt_window = 1
            guest.send(Command.STI_NOP)
            stop = guest.run()
            guest.vcpu.kvm_run.request_interrupt_window = 0
            if stop.kind != StopKind.WINDOW:
                return Observation("no window exit", f"next exit: {stop.describe()}")
            outcome = {guest.address("sti_nop_end"): "exit after sti; nop",
                       guest.address("sti_nop_nop"): "exit right after sti"}.get(stop.rip, "exit elsewhere")
            guest.run_until(StopKind.SYNC)
            return Observation(outcome, f"KVM_EXIT_IRQ_WINDOW_OPEN at RIP {stop.rip:#x} "
                                        f"({_label(guest, stop.rip)})")
    return {"irq_window": _most_common(trial)}


@scenario("interrupt_not_ready")
def interrupt_while_not_ready(kvm) -> dict[str, Observation]:
    """KVM_INTERRUPT (forced) while the guest has IF=0, then KVM_RUN."""
    vm, guest = _boot(kvm)
    with vm:
        guest.command(Command.CLI)
        guest.vcpu.interrupt(PROBE_VECTOR, force=True)
        guest.send(Command.NOP)
        stop = guest.run()
        if isinstance(stop.exit, FailEntryExit):
            return {"interrupt_not_ready": Observation("VM entry fails", stop.describe())}
        log = guest.log()
        if log:
            outcome = ("delivered although IF=0" if not log[0].interrupts_were_enabled
                       else "delivered after STI")
            detail = f"{log[0]!r}"
        else:
            outcome, detail = "held while IF=0", f"nothing logged; next exit {stop.describe()}"
        return {"interrupt_not_ready": Observation(outcome, detail)}


@scenario("nmi_blocking", "nmi_window")
def nmi_blocking(kvm) -> dict[str, Observation]:
    """An NMI; a second NMI while the first handler runs; where the second is taken."""
    vm, guest = _boot(kvm, notify=True)
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
        nested = len(log) > 1 and log[1].rip in handler
        if nested:
            blocking = Observation("nested inside the handler", f"{log[1]!r}")
        elif stop.rip in handler and masked and pending:
            blocking = Observation("held until IRET", "in the handler: NMI masked, second NMI pending")
        else:
            blocking = Observation("not blocked", f"masked={masked} pending={pending}")
        if len(log) > 1:
            window = Observation("delivered right after IRET",
                                 f"second NMI taken at {_label(guest, log[1].rip)} before the next exit")
        else:
            guest.command(Command.NOP)
            taken = guest.log()[1:]
            window = Observation("held until the next VM entry",
                                 "no NMI-window exit; after the IRET the NMI stayed pending, "
                                 f"taken at {_label(guest, taken[0].rip) if taken else 'no point'} "
                                 "after the next KVM_RUN")
        return {"nmi_blocking": blocking, "nmi_window": window}


def _lapic_session(kvm):
    """A VM with the in-kernel irqchip and an enabled xAPIC (CapabilityMissing without IRQCHIP)."""
    kvm.require(Cap.IRQCHIP, "the in-kernel LAPIC probes")
    vm, guest = _boot(kvm, irqchip="kernel")
    try:
        guest.apic_enable(auto_eoi=True)
    except BaseException:
        vm.close()
        raise
    return vm, guest


@scenario("lapic_after_sti")
def lapic_after_sti(kvm) -> dict[str, Observation]:
    """In-kernel LAPIC: an MSI arrives while IF=0; the guest then runs `sti; nop; out`."""
    def trial() -> Observation:
        vm, guest = _lapic_session(kvm)
        with vm:
            guest.command(Command.CLI)
            vm.signal_msi(destination=0, vector=MSI_VECTOR)
            guest.command(Command.STI_NOP)
            guest.command(Command.NOP)
            [taken] = guest.log()
            places = {guest.address("sti_nop_end"): "after the STI shadow",
                      guest.address("sti_nop_nop"): "right after sti",
                      guest.address("sync_done"): "at the next VM entry"}
            return Observation(places.get(taken.rip, "elsewhere"),
                               f"vector taken at {_label(guest, taken.rip)}")
    return {"lapic_after_sti": _most_common(trial)}


@scenario("lapic_isr")
def lapic_in_service(kvm) -> dict[str, Observation]:
    """In-kernel LAPIC: is the vector in the ISR while its handler has not EOId yet?"""
    vm, guest = _lapic_session(kvm)
    with vm:
        guest.auto_eoi = False
        guest.command(Command.STI)
        vm.signal_msi(destination=0, vector=MSI_VECTOR)
        guest.command(Command.NOP)
        isr = lapic.read(guest.vcpu).isr
        guest.eoi()
        outcome = "in service until EOI" if MSI_VECTOR in isr else "not in service"
        return {"lapic_isr": Observation(outcome, f"KVM_GET_LAPIC ISR before EOI: "
                                                  f"{sorted(hex(v) for v in isr) or 'empty'}")}


def _stepping_lapic_session(kvm):
    """:func:`_lapic_session` on a host that can single-step (CapabilityMissing otherwise)."""
    kvm.require(Cap.SET_GUEST_DEBUG, "single-stepping")
    return _lapic_session(kvm)


def _step(session: GuestSession) -> int:
    """One single-step; the RIP it stopped at."""
    exit = session.vcpu.run()
    if not isinstance(exit, DebugExit):
        raise GuestError(f"a single-step ended in {exit!r}")
    return session.vcpu.regs.rip


@scenario("sti_shadow")
def sti_shadow(kvm) -> dict[str, Observation]:
    """An MSI pending while IF=0; single-step `sti; nop`: is the vector held for the nop?

    Single-stepping makes every instruction a VM entry, so a host that injects only at
    entries (kvm_pvm) shows the shadow as well as one that injects at any boundary.
    """
    vm, guest = _stepping_lapic_session(kvm)
    with vm:
        guest.command(Command.CLI)
        guest.send(Command.STI_NOP)
        guest.vcpu.set_single_step(True)
        _step_to(guest, "sti_nop_sti")
        vm.signal_msi(destination=0, vector=MSI_VECTOR)       # IF=0: it waits in the IRR
        for _ in range(3):
            if guest.log_count() or _step(guest) == guest.address("sti_nop_end"):
                break
        guest.vcpu.set_single_step(False)
        guest.run_until(StopKind.SYNC)
        [taken] = guest.log()
        places = {guest.address("sti_nop_end"): "held for one instruction",
                  guest.address("sti_nop_nop"): "taken at once (no shadow)"}
        return {"sti_shadow": Observation(places.get(taken.rip, "elsewhere"),
                                          f"taken at {_label(guest, taken.rip)}")}


@scenario("mov_ss_shadow")
def mov_ss_shadow(kvm) -> dict[str, Observation]:
    """Single-step `mov %ax,%ss; nop` with IF=1: the trap or an interrupt must wait for the nop."""
    vm, guest = _stepping_lapic_session(kvm)
    with vm:
        vcpu = guest.vcpu
        guest.command(Command.STI)
        guest.send(Command.MOV_SS)
        vcpu.set_single_step(True)
        _step_to(guest, "mov_ss_mov")
        rip = _step(guest)
        if rip == guest.address("mov_ss_end"):
            vcpu.set_single_step(False)
            guest.run_until(StopKind.SYNC)
            return {"mov_ss_shadow": Observation("held for one instruction", "the single-step trap "
                                                 "after MOV SS came only after the nop")}
        shadow = vcpu.events.interrupt.shadow
        vm.signal_msi(destination=0, vector=MSI_VECTOR)       # pending at the shadowed nop
        _step(guest)
        vcpu.set_single_step(False)
        guest.run_until(StopKind.SYNC)
        [taken] = guest.log()
        outcome = {guest.address("mov_ss_end"): "held for one instruction",
                   guest.address("mov_ss_nop"): "taken at once (no shadow)"}.get(taken.rip, "elsewhere")
        return {"mov_ss_shadow": Observation(outcome, f"stepped to {_label(guest, rip)} (events "
                                             f"shadow={shadow:#x}); an MSI raised there was taken "
                                             f"at {_label(guest, taken.rip)}")}


@scenario("single_step", "step_sti_shadow", "hlt_single_step")
def single_step(kvm) -> dict[str, Observation]:
    """KVM_SET_GUEST_DEBUG single-step over a 2-iteration loop, over `sti; nop`, and over `hlt`."""
    kvm.require(Cap.SET_GUEST_DEBUG, "single-stepping")
    vm, guest = _boot(kvm)
    with vm:
        vcpu = guest.vcpu
        guest.send(Command.SPIN, 2)
        vcpu.set_single_step(True)
        rips = _step_to(guest, "spin_end")
        loop = guest.address("spin_loop")
        # dec; jnz twice: two stops at the loop head and two at the jnz after it
        stepped = rips.count(loop) == 2 and len([r for r in rips if loop < r < guest.address("spin_end")]) == 2
        steps = Observation("one exit per instruction" if stepped else "skips instructions",
                            f"{len(rips)} debug exits, {rips.count(loop)} at spin_loop")
        vcpu.set_single_step(False)
        guest.run_until(StopKind.SYNC)

        guest.command(Command.CLI)
        guest.send(Command.STI_NOP)
        vcpu.set_single_step(True)
        _step_to(guest, "sti_nop_sti")
        rip = _step(guest)
        shadow = vcpu.events.interrupt.shadow
        in_shadow = {guest.address("sti_nop_nop"): "stops in the shadow",
                     guest.address("sti_nop_end"): "trap held past the shadowed instruction"}
        sti_step = Observation(in_shadow.get(rip, "elsewhere"),
                               f"the step over sti stopped at {_label(guest, rip)}, events shadow={shadow:#x}")
        vcpu.set_single_step(False)
        guest.run_until(StopKind.SYNC)

        guest.send(Command.HLT)
        vcpu.set_single_step(True)
        _step_to(guest, "hlt_hlt")
        exit = vcpu.run()
        rip = vcpu.regs.rip
        vcpu.set_single_step(False)
        if isinstance(exit, DebugExit):
            halt = Observation("debug exit past the hlt" if rip == guest.address("hlt_end")
                               else "debug exit elsewhere", f"KVM_EXIT_DEBUG at {_label(guest, rip)}")
        elif isinstance(exit, HltExit):
            halt = Observation("halts", f"KVM_EXIT_HLT at {_label(guest, rip)}")
        else:
            halt = Observation("other exit", repr(exit))
        return {"single_step": steps, "step_sti_shadow": sti_step, "hlt_single_step": halt}


@scenario("triple_fault")
def triple_fault(kvm) -> dict[str, Observation]:
    """An IDT limit of 0, then #DE: #DE -> #GP -> #DF -> shutdown."""
    vm, guest = _boot(kvm)
    with vm:
        vcpu = guest.vcpu
        guest.command(Command.NOP)
        sregs = vcpu.sregs
        sregs.idt.limit = 0
        vcpu.sregs = sregs
        guest.send(Command.RAISE, 0)
        try:
            exit = guest.run().exit
        except GuestError as exc:
            return {"triple_fault": Observation("other exit", str(exc))}
        outcome = "KVM_EXIT_SHUTDOWN" if isinstance(exit, ShutdownExit) else "other exit"
        return {"triple_fault": Observation(outcome, repr(exit))}


def _delivery(kvm, mode: str) -> dict[str, Observation]:
    """One injected vector, one `int $n`, one `int3` in ``mode``: delivered, and returned from?"""
    results = {}
    trials = {f"delivery_{mode}": (lambda g: g.vcpu.interrupt(PROBE_VECTOR), Command.STI, 0),
              f"int_n_{mode}": (None, Command.INT, SOFTWARE_VECTOR),
              f"int3_{mode}": (None, Command.RAISE, 3)}
    for probe, (before, command, arg) in trials.items():
        vm, guest = _boot(kvm, mode)
        with vm:
            if before is not None:
                guest.command(command)
                before(guest)
                command, arg = Command.NOP, 0
            try:
                guest.command(command, arg)
            except HostLimitation as exc:
                failure = str(exc).split(";")[0]
                outcome = ("delivered, return fails" if guest.log() else "not delivered (emulation error)")
                results[probe] = Observation(outcome, failure)
                continue
            log = guest.log()
            results[probe] = Observation("delivered and returned" if log else "not delivered",
                                         f"{log[0]!r}" if log else "nothing logged")
    return results


@scenario("delivery_real", "int_n_real", "int3_real", "real_mode_ud2")
def delivery_real(kvm) -> dict[str, Observation]:
    results = _delivery(kvm, "real")
    vm, guest = _boot(kvm, "real")
    with vm:
        try:
            guest.command(Command.RAISE, 6)
            outcome = "#UD delivered" if [r.vector for r in guest.log()] == [6] else "not delivered"
            detail = repr(guest.log())
        except HostLimitation as exc:
            outcome, detail = "emulation error", str(exc).split(";")[0]
    results["real_mode_ud2"] = Observation(outcome, detail)
    return results


@scenario("delivery_protected", "int_n_protected", "int3_protected")
def delivery_protected(kvm) -> dict[str, Observation]:
    return _delivery(kvm, "protected")


@scenario("delivery_long", "int_n_long", "int3_long")
def delivery_long(kvm) -> dict[str, Observation]:
    return _delivery(kvm, "long")


def run_probes(kvm) -> dict[str, Observation]:
    """Every scenario's probes: unsupported (outcome None) where the host lacks a capability,
    "probe failed" where a scenario broke unexpectedly (the doctor reports it, it does not stop)."""
    observed: dict[str, Observation] = {}
    for function, probes in SCENARIOS:
        try:
            observed.update(function(kvm))
        except CapabilityMissing as exc:
            observed.update({probe: Observation(None, f"{type(exc).__name__}: {exc}") for probe in probes})
        except Exception as exc:
            observed.update({probe: Observation("probe failed", f"{function.__name__}: "
                                                f"{type(exc).__name__}: {exc}") for probe in probes})
    return observed
