"""Lab 7: NMIs. Read sheet.md first; fill in the TODOs; check with `python lab.py` in this folder."""

from pykvm.guests import Command, StopKind  # noqa: F401


def nmis(task) -> None:
    """Make the guest take task.count NMIs, each after the first raised inside the previous handler."""
    print("task:", task)
    # TODO: vcpu.nmi(); send Command.NOP; run_until(StopKind.VECTOR, StopKind.SYNC) in a loop:
    #       at a VECTOR stop of the NMI raise the next one (until task.count), at a SYNC stop
    #       send Command.NOP again, until task.guest.log() holds task.count NMIs.
    raise NotImplementedError("TODO in nmis() (sheet.md, Steps)")


if __name__ == "__main__":
    from pykvm.labs.runner import check_here

    check_here(7, __file__)
