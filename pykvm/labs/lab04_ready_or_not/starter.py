"""Lab 4: Ready or not. Read sheet.md first; fill in the TODOs; check with `python lab.py` in this folder."""

from pykvm.guests import Command  # noqa: F401  (Command.STI, Command.NOP ...)


def inject_when_ready(task) -> None:
    """The guest has IF=0: make it ready, inject task.vector, let the guest take it."""
    print("task:", task)
    # TODO: make the guest ready (a command), check task.guest.vcpu.kvm_run, inject task.vector,
    #       then run the guest so that it takes it.
    raise NotImplementedError("TODO in inject_when_ready() (sheet.md, step 1)")


def inject_while_masked(task) -> str:
    """The guest has IF=0: force task.vector in, run, return "delivered", "entry failed" or "held"."""
    # TODO: inject with the bare task.guest.vcpu.interrupt(), run the guest (task.guest.run() gives one exit),
    #       look at the exit and task.guest.log(), and say what happened.
    raise NotImplementedError("TODO in inject_while_masked() (sheet.md, step 2)")


if __name__ == "__main__":
    from pykvm.labs.runner import check_here

    check_here(4, __file__)
