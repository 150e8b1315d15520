"""Lab 4, wrong: injects at once with the bare KVM_INTERRUPT, without making the guest ready, and guesses."""

from pykvm.guests import Command

# What the checker must say: [(the 1-based step that fails, a phrase its reason contains), ...]; any one.
# kvm_intel (measured under Bochs): the VM entry itself fails, KVM_EXIT_FAIL_ENTRY 0x80000021,
# which pykvm explains; the run stops there.
EXPECTED_FAILURES = [(1, 'you injected while the last exit reported ready_for_interrupt_injection=0'),
                     (1, 'VM entry failed (0x80000021): invalid guest state')]


def inject_when_ready(task) -> None:
    task.guest.vcpu.interrupt(task.vector)
    task.guest.command(Command.NOP)


def inject_while_masked(task) -> str:
    task.guest.vcpu.interrupt(task.vector)
    task.guest.command(Command.NOP)
    return "held"
