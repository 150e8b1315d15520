"""Probes of the in-kernel LAPIC: lapic_after_sti, lapic_isr.

Why this exists: with the in-kernel irqchip KVM itself decides when a pending
vector is injected and what the LAPIC's ISR holds; a host that injects only at
VM entries, or keeps nothing in service, makes level-triggered lines and
`sti; hlt` idioms behave differently.
"""

from __future__ import annotations

from ...guests import Command
from ...irqchip.lapic import read as read_lapic
from .base import Expectation, Observation, ProbeOutcome, measured, scenario
from .harness import MSI_VECTOR, lapic_session, most_common, taken


class LapicAfterSti(ProbeOutcome):
    AFTER_SHADOW = "after the STI shadow"
    RIGHT_AFTER_STI = "right after sti"
    NEXT_ENTRY = "at the next VM entry"
    ELSEWHERE = "elsewhere"
    NOT_TAKEN = "not taken"


LAPIC_AFTER_STI = Expectation(
    "lapic_after_sti", "in-kernel LAPIC: a vector pending while IF=0, then `sti; nop; out`",
    LapicAfterSti.AFTER_SHADOW, "x86.c inject_pending_event / enable_irq_window: KVM asks for the "
    "interrupt window and injects as soon as it opens",
    measured(LapicAfterSti.NEXT_ENTRY, LapicAfterSti.AFTER_SHADOW, LapicAfterSti.AFTER_SHADOW),
    {LapicAfterSti.NEXT_ENTRY: "the host injects pending LAPIC vectors only at a VM entry, so the "
                               "vector waits for the guest's next exit"},
    "lapic_delivers_when_unblocked")


@scenario(LAPIC_AFTER_STI)
def lapic_after_sti(kvm) -> Observation:
    """In-kernel LAPIC: an MSI arrives while IF=0; the guest then runs `sti; nop; out`."""
    def trial() -> Observation:
        vm, guest = lapic_session(kvm)
        with vm:
            guest.command(Command.CLI)
            vm.signal_msi(destination=0, vector=MSI_VECTOR)
            guest.command(Command.STI_NOP)
            guest.command(Command.NOP)
            places = {"sti_nop_end": LapicAfterSti.AFTER_SHADOW, "sti_nop_nop": LapicAfterSti.RIGHT_AFTER_STI,
                      "sync_done": LapicAfterSti.NEXT_ENTRY}
            seen = taken(guest, MSI_VECTOR, places, LapicAfterSti.ELSEWHERE, LapicAfterSti.NOT_TAKEN)
            return Observation(seen.outcome, f"vector {seen.detail}")
    return most_common(trial)


class LapicIsr(ProbeOutcome):
    IN_SERVICE = "in service until EOI"
    NOT_IN_SERVICE = "not in service"


LAPIC_ISR = Expectation(
    "lapic_isr", "in-kernel LAPIC: ISR bit while the handler has not EOId", LapicIsr.IN_SERVICE,
    "Intel SDM Vol. 3A, local APIC 'Interrupt Acceptance for Fixed Interrupts'; lapic.c "
    "kvm_get_apic_interrupt",
    measured(LapicIsr.NOT_IN_SERVICE, LapicIsr.IN_SERVICE, LapicIsr.IN_SERVICE),
    {LapicIsr.NOT_IN_SERVICE: "the host's LAPIC does not track delivered vectors in the ISR: KVM EOIs a "
                              "vector as it injects it (a kvm_eoi trace event before the guest's EOI write), "
                              "so a level-triggered line still high is delivered again before the guest's EOI"},
    "lapic_tracks_in_service")


@scenario(LAPIC_ISR)
def lapic_isr(kvm) -> Observation:
    """In-kernel LAPIC: is the vector in the ISR while its handler has not EOId yet?"""
    vm, guest = lapic_session(kvm)
    with vm:
        guest.auto_eoi = False
        guest.command(Command.STI)
        vm.signal_msi(destination=0, vector=MSI_VECTOR)
        guest.command(Command.NOP)
        isr = read_lapic(guest.vcpu).isr
        guest.eoi()
        return Observation(LapicIsr.IN_SERVICE if MSI_VECTOR in isr else LapicIsr.NOT_IN_SERVICE,
                           f"KVM_GET_LAPIC ISR before EOI: {sorted(hex(v) for v in isr) or 'empty'}")
