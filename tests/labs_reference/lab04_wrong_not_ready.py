"""Lab 4, wrong: injects at once, without making the guest ready (force), and guesses the answer."""

from pykvm.guests import Command

# What the checker must say: [(the 1-based step that fails, a phrase its reason contains), ...]; any one.
EXPECTED_FAILURES = [(1, 'force=True while the last exit reported')]


def inject_when_ready(task) -> None:
    task.guest.vcpu.interrupt(task.vector, force=True)
    task.guest.command(Command.NOP)


def inject_while_masked(task) -> str:
    task.guest.vcpu.interrupt(task.vector, force=True)
    task.guest.command(Command.NOP)
    return "held"
