"""Probes of the interrupt shadows after STI and MOV SS: sti_shadow, mov_ss_shadow.

Why this exists: an interrupt must not be taken between `sti` (or `mov ss`) and
the next instruction. Single-stepping makes every instruction a VM entry, so a
host that injects only at entries (kvm_pvm) shows the shadow as well as one
that injects at any instruction boundary.

Under single-step a vector taken inside a shadowed instruction's handler saves
RFLAGS with the trap flag set; once single-stepping stops, its IRET restores
it and the guest logs #DB after #DB. Both scenarios therefore look for the
vector in the log (:func:`~pykvm.hosts.probes.harness.where_taken`) instead of
expecting exactly one record.
"""

from __future__ import annotations

from ...guests import Command, GuestSession
from .base import Expectation, Observation, ProbeOutcome, measured, scenario
from .harness import MSI_VECTOR, label, lapic_session, start_stepping, step, stop_stepping, taken


class Shadow(ProbeOutcome):
    HELD = "held for one instruction"
    TAKEN_AT_ONCE = "taken at once (no shadow)"
    ELSEWHERE = "elsewhere"
    NOT_TAKEN = "not taken"


def _msi_taken(guest: GuestSession, shadowed: str, after: str) -> Observation:
    """Was the MSI taken after the shadowed instruction (held), or before it (no shadow)?"""
    return taken(guest, MSI_VECTOR, {after: Shadow.HELD, shadowed: Shadow.TAKEN_AT_ONCE},
                 Shadow.ELSEWHERE, Shadow.NOT_TAKEN)


# What the measurement on kvm_intel showed, step by step (userspace irqchip, request_interrupt_window
# at the shadowed nop): KVM reported the shadow (events shadow=0x2, ready=0) and only asked for the
# window, and the next entry's window exit came at the nop, with the shadow gone.
KVM_INTEL_STEPPING_SHADOW = (
    "the step over sti stops at the nop with events shadow=0x2 and ready=0, but kvm_intel clears "
    "the STI / MOV SS interruptibility bits before every VM entry while KVM_GUESTDBG_SINGLESTEP is "
    "on (vmx.c vmx_vcpu_run: otherwise the VM entry would demand the BS bit in the pending debug "
    "exceptions), so the next entry has no shadow: the interrupt-window exit, or the LAPIC vector, "
    "comes before the nop runs. A KVM behaviour under single-step, not Bochs's; without single-step "
    "the shadow holds (irq_window, lapic_after_sti)")

STI_SHADOW = Expectation(
    "sti_shadow", "STI shadow (single-stepped, in-kernel LAPIC vector pending)", Shadow.HELD,
    "Intel SDM Vol. 2B 'STI' (interrupts recognised after the next instruction); "
    "KVM_GET_VCPU_EVENTS interrupt.shadow",
    measured(Shadow.HELD, Shadow.HELD, Shadow.TAKEN_AT_ONCE,
             pvm_note="PVM's spec says native long mode has no shadow; under single-step the shadow is "
                      "honoured and reported",
             intel_note=KVM_INTEL_STEPPING_SHADOW),
    {Shadow.TAKEN_AT_ONCE: "the interrupt was taken inside the STI shadow"},
    "long_mode_interrupt_shadow")


@scenario(STI_SHADOW)
def sti_shadow(kvm) -> Observation:
    """An MSI pending while IF=0; single-step `sti; nop`: is the vector held for the nop?"""
    vm, guest = lapic_session(kvm, stepping=True)
    with vm:
        vcpu, end = guest.vcpu, guest.address("sti_nop_end")
        guest.command(Command.CLI)
        start_stepping(guest, Command.STI_NOP, "sti_nop_sti")
        vm.signal_msi(destination=0, vector=MSI_VECTOR)       # IF=0: it waits in the IRR
        rip = step(guest)                                     # over the sti
        shadow = vcpu.events.interrupt.shadow
        for _ in range(2):
            if guest.log_count() or rip == end:
                break
            rip = step(guest)
        stop_stepping(guest)
        seen = _msi_taken(guest, "sti_nop_nop", "sti_nop_end")
        return Observation(seen.outcome, f"{seen.detail}; events shadow after the step over sti: "
                                         f"{shadow:#x}")


MOV_SS_SHADOW = Expectation(
    "mov_ss_shadow", "MOV SS shadow (single-stepped, in-kernel LAPIC vector pending)", Shadow.HELD,
    "Intel SDM Vol. 3A 6.8.3 'Masking Exceptions and Interrupts When Switching Stacks'",
    measured(Shadow.HELD, Shadow.HELD, Shadow.HELD),
    {Shadow.TAKEN_AT_ONCE: "the interrupt was taken inside the MOV SS shadow"})


@scenario(MOV_SS_SHADOW)
def mov_ss_shadow(kvm) -> Observation:
    """Single-step `mov %ax,%ss; nop` with IF=1: the trap or an interrupt must wait for the nop."""
    vm, guest = lapic_session(kvm, stepping=True)
    with vm:
        vcpu = guest.vcpu
        guest.command(Command.STI)
        start_stepping(guest, Command.MOV_SS, "mov_ss_mov")
        rip = step(guest)
        if rip == guest.address("mov_ss_end"):
            stop_stepping(guest)
            return Observation(Shadow.HELD, "the single-step trap after MOV SS came only after the nop")
        shadow = vcpu.events.interrupt.shadow
        vm.signal_msi(destination=0, vector=MSI_VECTOR)       # pending at the shadowed nop
        step(guest)
        stop_stepping(guest)
        seen = _msi_taken(guest, "mov_ss_nop", "mov_ss_end")
        return Observation(seen.outcome, f"stepped to {label(guest, rip)} (events shadow={shadow:#x}); "
                                         f"an MSI raised there was {seen.detail}")
