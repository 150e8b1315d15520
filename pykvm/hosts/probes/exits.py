"""Probes of KVM_RUN's exits and KVM_INTERRUPT with the userspace irqchip: io_exit_rip, and per CPU mode
irq_window and interrupt_not_ready (irq_window_real, interrupt_not_ready_protected, ...).

Why this exists: with no in-kernel irqchip, userspace injects interrupts itself,
and depends on where KVM reports RIP, when it opens the interrupt window, and
whether it checks IF before injecting. Hosts differ in all three.
"""

from __future__ import annotations

import functools

from ...core.errors import GuestError
from ...core.exits import FailEntryExit
from ...guests import Command, StopKind
from .base import Expectation, Observation, ProbeOutcome, in_mode, measured, mode_note, scenario
from .harness import PROBE_VECTOR, boot, internal_error, label, most_common, run_once


class IoExitRip(ProbeOutcome):
    AT_OUT = "at the out"
    PAST_OUT = "past the out"
    ELSEWHERE = "elsewhere"


IO_EXIT_RIP = Expectation(
    "io_exit_rip", "RIP reported at a KVM_EXIT_IO for `out`", IoExitRip.AT_OUT,
    "api.rst 'kvm_run': an IO exit's instruction completes only on the next KVM_RUN; "
    "x86.c kvm_fast_pio / complete_fast_pio_out",
    measured(IoExitRip.PAST_OUT, IoExitRip.AT_OUT, IoExitRip.AT_OUT),
    {IoExitRip.PAST_OUT: "the host reports RIP after the `out`; the instruction is already complete"},
    "io_exit_rip_at_out")


@scenario(IO_EXIT_RIP)
def io_exit_rip(kvm) -> Observation:
    """Where RIP points when KVM reports the guest's sync `out` as KVM_EXIT_IO."""
    vm, guest = boot(kvm)
    with vm:
        stop = guest.command(Command.NOP)
        places = {guest.address("sync_out"): IoExitRip.AT_OUT,
                  guest.address("sync_done"): IoExitRip.PAST_OUT}
        return Observation(places.get(stop.rip, IoExitRip.ELSEWHERE),
                           f"RIP {stop.rip:#x} ({label(guest, stop.rip)})")


class IrqWindow(ProbeOutcome):
    AFTER_STI_NOP = "exit after sti; nop"
    RIGHT_AFTER_STI = "exit right after sti"
    ELSEWHERE = "exit elsewhere"
    NO_EXIT = "no window exit"


IRQ_WINDOW_SOURCE = ("api.rst request_interrupt_window / KVM_EXIT_IRQ_WINDOW_OPEN; Intel SDM Vol. 3C "
                     "'interrupt-window exiting'; AMD APM Vol. 2 'virtual interrupt intercept (VINTR)'")
IRQ_WINDOW_EXPLANATIONS: dict[ProbeOutcome, str] = {
    IrqWindow.NO_EXIT: "the host sends no KVM_EXIT_IRQ_WINDOW_OPEN when the guest's STI opens the window (it "
                       "checks the request only at VM entries, where IF=1 already exits at once); inject at the "
                       "next exit that reports ready_for_interrupt_injection=1",
    IrqWindow.RIGHT_AFTER_STI: "the window opened inside the STI shadow"}
# What each vendor module did, per mode: (kvm_pvm, kvm_amd, kvm_intel).
IRQ_WINDOW_RECORDS: dict[str, tuple[ProbeOutcome, ProbeOutcome, ProbeOutcome]] = {
    "real": (IrqWindow.NO_EXIT, IrqWindow.AFTER_STI_NOP, IrqWindow.AFTER_STI_NOP),
    "protected": (IrqWindow.NO_EXIT, IrqWindow.AFTER_STI_NOP, IrqWindow.AFTER_STI_NOP),
    "long": (IrqWindow.NO_EXIT, IrqWindow.AFTER_STI_NOP, IrqWindow.AFTER_STI_NOP),
}


def irq_window(kvm, mode: str) -> Observation:
    """request_interrupt_window while IF=0, then the guest runs `sti; nop; out`."""
    def trial() -> Observation:
        vm, guest = boot(kvm, mode)
        with vm:
            guest.command(Command.CLI)
            guest.vcpu.kvm_run.request_interrupt_window = 1
            guest.send(Command.STI_NOP)
            stop = run_once(guest)
            guest.vcpu.kvm_run.request_interrupt_window = 0
            if stop.kind != StopKind.WINDOW:
                return Observation(IrqWindow.NO_EXIT, f"next exit: {stop.describe()}")
            outcome = {guest.address("sti_nop_end"): IrqWindow.AFTER_STI_NOP,
                       guest.address("sti_nop_nop"): IrqWindow.RIGHT_AFTER_STI}.get(
                           stop.rip, IrqWindow.ELSEWHERE)
            guest.run_until(StopKind.SYNC)
            return Observation(outcome, f"KVM_EXIT_IRQ_WINDOW_OPEN at RIP {stop.rip:#x} "
                                        f"({label(guest, stop.rip)})")
    return most_common(trial)


def _register_irq_window(mode: str) -> None:
    pvm, amd, intel = IRQ_WINDOW_RECORDS[mode]
    scenario(Expectation(
        in_mode("irq_window", mode), f"IRQ window exit after `sti; nop` (userspace irqchip), {mode} mode",
        IrqWindow.AFTER_STI_NOP, IRQ_WINDOW_SOURCE, measured(pvm, amd, intel, intel_note=mode_note(mode),
                                                             amd_note=mode_note(mode)),
        IRQ_WINDOW_EXPLANATIONS,
        in_mode("sends_irq_window_exits", mode)))(functools.partial(irq_window, mode=mode))


for _mode in IRQ_WINDOW_RECORDS:
    _register_irq_window(_mode)


class NotReady(ProbeOutcome):
    HELD = "held while IF=0"
    DELIVERED_WITH_IF_CLEAR = "delivered although IF=0"
    DELIVERED_AFTER_STI = "delivered after STI"
    ENTRY_FAILS = "VM entry fails"


INTEL_ENTRY_CHECK = (
    "KVM_EXIT_FAIL_ENTRY with hardware_entry_failure_reason 0x80000021 (invalid guest state); Bochs's log "
    "names the check, 'VMENTER FAIL: VMCS guest interrupts blocked when injecting external interrupt': the "
    "SDM's VM-entry check of guest RFLAGS (Vol. 3C 'Checks on Guest RIP, RFLAGS, and SSP': IF must be 1 when "
    "an external interrupt is injected), an architectural check, not a Bochs one")
NOT_READY_SOURCE = ("Intel SDM Vol. 3A 6.8.1 (IF masks external interrupts); api.rst: inject only when "
                    "ready_for_interrupt_injection=1")
NOT_READY_EXPLANATIONS: dict[ProbeOutcome, str] = {
    NotReady.DELIVERED_WITH_IF_CLEAR: "KVM injects the event regardless of IF; userspace must wait for "
                                      "ready_for_interrupt_injection=1 (pykvm.injection.Injector refuses otherwise)",
    NotReady.ENTRY_FAILS: "VT-x's VM-entry checks reject an external interrupt with RFLAGS.IF=0"}
NOT_READY_RECORDS: dict[str, tuple[ProbeOutcome, ProbeOutcome, ProbeOutcome]] = {
    "real": (NotReady.DELIVERED_WITH_IF_CLEAR, NotReady.DELIVERED_WITH_IF_CLEAR, NotReady.ENTRY_FAILS),
    "protected": (NotReady.DELIVERED_WITH_IF_CLEAR, NotReady.DELIVERED_WITH_IF_CLEAR, NotReady.ENTRY_FAILS),
    "long": (NotReady.DELIVERED_WITH_IF_CLEAR, NotReady.DELIVERED_WITH_IF_CLEAR, NotReady.ENTRY_FAILS),
}


def interrupt_not_ready(kvm, mode: str) -> Observation:
    """The bare KVM_INTERRUPT while the guest has IF=0 (an Injector would refuse it), then KVM_RUN."""
    vm, guest = boot(kvm, mode)
    with vm:
        guest.command(Command.CLI)
        guest.vcpu.interrupt(PROBE_VECTOR)
        guest.send(Command.NOP)
        try:
            stop = run_once(guest)
        except GuestError as exc:        # the handler ran, its return did not (kvm_pvm's protected mode)
            if internal_error(exc) is None or not guest.log():
                raise
            record = guest.log()[0]
            return Observation(NotReady.DELIVERED_WITH_IF_CLEAR if not record.interrupts_were_enabled
                               else NotReady.DELIVERED_AFTER_STI,
                               f"{record!r}; then {str(exc).split(';')[0]}")
        if isinstance(stop.exit, FailEntryExit):
            return Observation(NotReady.ENTRY_FAILS, f"{stop.describe()}: hardware_entry_failure_reason "
                                                     f"{stop.exit.hardware_entry_failure_reason:#x}")
        log = guest.log()
        if not log:
            return Observation(NotReady.HELD, f"nothing logged; next exit {stop.describe()}")
        return Observation(NotReady.DELIVERED_WITH_IF_CLEAR if not log[0].interrupts_were_enabled
                           else NotReady.DELIVERED_AFTER_STI, f"{log[0]!r}")


def _register_not_ready(mode: str) -> None:
    pvm, amd, intel = NOT_READY_RECORDS[mode]
    scenario(Expectation(
        in_mode("interrupt_not_ready", mode), f"KVM_INTERRUPT while the guest has IF=0, {mode} mode",
        NotReady.HELD, NOT_READY_SOURCE, measured(pvm, amd, intel, intel_note=mode_note(mode, INTEL_ENTRY_CHECK),
                                         amd_note=mode_note(mode)),
        NOT_READY_EXPLANATIONS, in_mode("interrupt_held_while_not_ready", mode)))(
            functools.partial(interrupt_not_ready, mode=mode))


for _mode in NOT_READY_RECORDS:
    _register_not_ready(_mode)
