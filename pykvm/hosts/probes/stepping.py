"""Probes of KVM_SET_GUEST_DEBUG single-stepping: single_step, step_sti_shadow (per CPU mode), hlt_single_step.

Why this exists: the shadow probes and many tests single-step guests, and hosts
differ in where the trap comes after `sti` and in whether a stepped `hlt` halts.
"""

from __future__ import annotations

import functools

from ...core.constants import Cap
from ...core.exits import DebugExit, HltExit
from ...guests import Command
from .base import Expectation, Observation, ProbeOutcome, in_mode, measured, mode_note, scenario
from .harness import boot, label, start_stepping, step, stop_stepping


def _stepping_session(kvm, mode: str = "long"):
    """A VM with one booted vCPU on a host that can single-step (CapabilityMissing otherwise)."""
    kvm.require(Cap.SET_GUEST_DEBUG, "single-stepping")
    return boot(kvm, mode)


class SingleStep(ProbeOutcome):
    EVERY_INSTRUCTION = "one exit per instruction"
    SKIPS = "skips instructions"


SINGLE_STEP = Expectation(
    "single_step", "KVM_SET_GUEST_DEBUG single-step", SingleStep.EVERY_INSTRUCTION,
    "api.rst KVM_SET_GUEST_DEBUG, KVM_GUESTDBG_SINGLESTEP",
    measured(SingleStep.EVERY_INSTRUCTION, SingleStep.EVERY_INSTRUCTION, SingleStep.EVERY_INSTRUCTION))


@scenario(SINGLE_STEP)
def single_step(kvm) -> Observation:
    """Single-step a 2-iteration `dec; jnz` loop: one debug exit per instruction?"""
    vm, guest = _stepping_session(kvm)
    with vm:
        rips = start_stepping(guest, Command.SPIN, "spin_end", 2)
        stop_stepping(guest)
        loop, end = guest.address("spin_loop"), guest.address("spin_end")
        # dec; jnz twice: two stops at the loop head and two at the jnz after it
        stepped = rips.count(loop) == 2 and len([rip for rip in rips if loop < rip < end]) == 2
        return Observation(SingleStep.EVERY_INSTRUCTION if stepped else SingleStep.SKIPS,
                           f"{len(rips)} debug exits, {rips.count(loop)} at spin_loop")


class StepStiShadow(ProbeOutcome):
    STOPS_IN_SHADOW = "stops in the shadow"
    HELD_PAST_SHADOW = "trap held past the shadowed instruction"
    ELSEWHERE = "elsewhere"


# Where the emulator under kvm_intel, not KVM, decided the outcome once: the A/B below ran the
# same kernel, disk image, pykvm and probe under two Bochs builds.
BOCHS_STI_SHADOW = (
    "the events report KVM_X86_SHADOW_INT_STI (shadow=0x2) at the shadowed nop. Bochs 2.7 gave "
    "shadow=0x0 there: its VMexit_Event cleared the STI blocking before the VM exit saved the "
    "interruptibility state; Bochs 3.0 keeps it, as the Intel SDM requires (Vol. 3C 27.1: an "
    "event that causes a VM exit directly does not update architectural state; 27.3.4: the "
    "interruptibility state is saved as it was before the VM exit). The record is Bochs 3.0's; "
    "a shadow of 0 here on an older Bochs is the emulator, not kvm_intel")

STEP_STI_SHADOW_SOURCE = ("Intel SDM Vol. 3A 6.8.3 holds debug exceptions only after MOV SS / POP SS; STI "
                          "delays interrupts, not the single-step trap")
STEP_STI_SHADOW_EXPLANATIONS: dict[ProbeOutcome, str] = {
    StepStiShadow.HELD_PAST_SHADOW: "the host treats the STI shadow like MOV SS's and holds the single-step "
                                    "trap over the next instruction"}
# What each vendor module did, per mode: (kvm_pvm, kvm_amd, kvm_intel).
STEP_STI_SHADOW_RECORDS: dict[str, tuple[ProbeOutcome, ProbeOutcome, ProbeOutcome]] = {
    "real": (StepStiShadow.STOPS_IN_SHADOW, StepStiShadow.HELD_PAST_SHADOW, StepStiShadow.STOPS_IN_SHADOW),
    "protected": (StepStiShadow.STOPS_IN_SHADOW, StepStiShadow.HELD_PAST_SHADOW, StepStiShadow.STOPS_IN_SHADOW),
    "long": (StepStiShadow.STOPS_IN_SHADOW, StepStiShadow.HELD_PAST_SHADOW, StepStiShadow.STOPS_IN_SHADOW),
}


def step_sti_shadow(kvm, mode: str) -> Observation:
    """Single-step over `sti` with IF=0: does the trap stop at the shadowed nop or after it?"""
    vm, guest = _stepping_session(kvm, mode)
    with vm:
        guest.command(Command.CLI)
        start_stepping(guest, Command.STI_NOP, "sti_nop_sti")
        rip = step(guest)
        shadow = guest.vcpu.events.interrupt.shadow
        stop_stepping(guest)
        places = {guest.address("sti_nop_nop"): StepStiShadow.STOPS_IN_SHADOW,
                  guest.address("sti_nop_end"): StepStiShadow.HELD_PAST_SHADOW}
        return Observation(places.get(rip, StepStiShadow.ELSEWHERE),
                           f"the step over sti stopped at {label(guest, rip)}, events shadow={shadow:#x}")


def _register_step_sti_shadow(mode: str) -> None:
    pvm, amd, intel = STEP_STI_SHADOW_RECORDS[mode]
    scenario(Expectation(
        in_mode("step_sti_shadow", mode), f"single-step over `sti`: where the next debug exit comes, {mode} mode",
        StepStiShadow.STOPS_IN_SHADOW, STEP_STI_SHADOW_SOURCE, measured(pvm, amd, intel,
                                                                        intel_note=mode_note(mode, BOCHS_STI_SHADOW),
                                                                        amd_note=mode_note(mode)),
        STEP_STI_SHADOW_EXPLANATIONS, in_mode("single_step_stops_in_sti_shadow", mode)))(
            functools.partial(step_sti_shadow, mode=mode))


for _mode in STEP_STI_SHADOW_RECORDS:
    _register_step_sti_shadow(_mode)


class HltStep(ProbeOutcome):
    HALTS = "halts"
    DEBUG_EXIT_PAST_HLT = "debug exit past the hlt"
    DEBUG_EXIT_ELSEWHERE = "debug exit elsewhere"
    OTHER_EXIT = "other exit"


HLT_SINGLE_STEP = Expectation(
    "hlt_single_step", "HLT executed under single-step", HltStep.HALTS,
    "Intel SDM Vol. 2A 'HLT' (the processor halts until an interrupt, NMI, SMI or INIT; the "
    "single-step trap follows the completed instruction); api.rst KVM_EXIT_HLT",
    measured(HltStep.DEBUG_EXIT_PAST_HLT, HltStep.HALTS, HltStep.HALTS),
    {HltStep.DEBUG_EXIT_PAST_HLT: "KVM skips the hlt and reports the single-step first "
                                  "(x86.c kvm_emulate_halt -> kvm_skip_emulated_instruction); "
                                  "the vCPU never halts"})


@scenario(HLT_SINGLE_STEP)
def hlt_single_step(kvm) -> Observation:
    """Single-step onto `hlt` with IF=1, then one more step: KVM_EXIT_HLT or a debug exit?"""
    vm, guest = _stepping_session(kvm)
    with vm:
        vcpu = guest.vcpu
        guest.command(Command.STI)
        start_stepping(guest, Command.HLT, "hlt_hlt")
        exit = vcpu.run()
        rip = vcpu.regs.rip
        vcpu.set_single_step(False)
        if isinstance(exit, HltExit):
            return Observation(HltStep.HALTS, f"KVM_EXIT_HLT at {label(guest, rip)}")
        if isinstance(exit, DebugExit):
            return Observation(HltStep.DEBUG_EXIT_PAST_HLT if rip == guest.address("hlt_end")
                               else HltStep.DEBUG_EXIT_ELSEWHERE, f"KVM_EXIT_DEBUG at {label(guest, rip)}")
        return Observation(HltStep.OTHER_EXIT, repr(exit))
