"""Lab 6, wrong: injects (forced) at the stop on the sti, before the guest can take it."""

from pykvm.guests import Command, StopKind

# What the checker must say: [(the 1-based step that fails, a phrase its reason contains), ...]; any one.
EXPECTED_FAILURES = [(2, 'ready_for_interrupt_injection=0')]


def _step_to(guest, label: str) -> None:
    for _ in range(64):
        guest.vcpu.run()
        if guest.vcpu.regs.rip == guest.address(label):
            return
    raise AssertionError(f"never reached {label}")


def inject_after_sti(task) -> None:
    guest, vcpu = task.guest, task.guest.vcpu
    guest.send(Command.STI_NOP)
    vcpu.set_single_step(True)
    _step_to(guest, "sti_nop_sti")
    vcpu.interrupt(task.vector, force=True)
    vcpu.set_single_step(False)
    guest.run_until(StopKind.SYNC)


def mov_ss_steps(task) -> list:
    guest, vcpu = task.guest, task.guest.vcpu
    guest.send(Command.MOV_SS)
    vcpu.set_single_step(True)
    _step_to(guest, "mov_ss_mov")
    rips = [vcpu.regs.rip]
    for _ in range(2):
        vcpu.run()
        rips.append(vcpu.regs.rip)
    vcpu.set_single_step(False)
    guest.run_until(StopKind.SYNC)
    return rips
