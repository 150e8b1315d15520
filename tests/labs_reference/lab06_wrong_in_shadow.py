"""Lab 6, wrong: injects (forced) at the stop on the sti, before the guest can take it."""

from pykvm.guests import Command, StopKind

# What the checker must say: [(the 1-based step that fails, a phrase its reason contains), ...]; any one.
EXPECTED_FAILURES = [(2, 'ready_for_interrupt_injection=0')]


def inject_after_sti(task) -> None:
    guest, vcpu = task.guest, task.guest.vcpu
    guest.send(Command.STI_NOP)
    vcpu.set_single_step(True)
    _step_to(guest, "sti_nop_sti")
    vcpu.interrupt(task.vector, force=True)
    vcpu.set_single_step(False)
    guest.run_until(StopKind.SYNC)
