"""Lab 6, wrong: injects (the bare KVM_INTERRUPT) at the stop on the sti, before the guest can take it."""

from pykvm.guests import Command, StopKind

# What the checker must say: [(the 1-based step that fails, a phrase its reason contains), ...]; any one.
# kvm_intel (measured under Bochs): the VM entry itself fails, KVM_EXIT_FAIL_ENTRY 0x80000021,
# which pykvm explains; the run stops there.
EXPECTED_FAILURES = [(2, 'ready_for_interrupt_injection=0'), (1, 'VM entry failed (0x80000021): invalid guest state')]


def inject_after_sti(task) -> None:
    guest, vcpu = task.guest, task.guest.vcpu
    guest.send(Command.STI_NOP)
    vcpu.set_single_step(True)
    _step_to(guest, "sti_nop_sti")
    vcpu.interrupt(task.vector)
    vcpu.set_single_step(False)
    guest.run_until(StopKind.SYNC)
