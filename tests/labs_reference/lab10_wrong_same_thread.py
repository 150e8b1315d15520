"""Lab 10, wrong: writes the irqfd on the vCPU's own thread before the vCPU halts, then runs WAIT_LOG."""

from pykvm.guests import Command

# What the checker must say: [(the 1-based step that fails, a phrase its reason contains), ...]; any one.
EXPECTED_FAILURES = [(3, "on the thread that runs vCPU")]


def wake(task) -> None:
    with task.vm.irqfd(task.gsi) as irqfd:
        irqfd.trigger()                                   # pending before anything waits for it
        task.target.command(Command.WAIT_LOG, 1)          # returns at once: the log already holds it
