"""Lab 4, wrong: injects at once, without making the guest ready (force), and guesses the answer."""

from pykvm.guests import Command


def inject_when_ready(task) -> None:
    task.guest.vcpu.interrupt(task.vector, force=True)
    task.guest.command(Command.NOP)


def inject_while_masked(task) -> str:
    task.guest.vcpu.interrupt(task.vector, force=True)
    task.guest.command(Command.NOP)
    return "held"
