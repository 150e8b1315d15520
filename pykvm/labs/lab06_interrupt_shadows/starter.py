"""Lab 6: Interrupt shadows. Read sheet.md first; fill in the TODOs; check with `python lab.py` in this folder."""

from pykvm.guests import Command, StopKind  # noqa: F401


def inject_after_sti(task) -> None:
    """Single-step `sti; nop`; inject task.vector at the first stop that reports ready."""
    print("task:", task)
    # TODO: send Command.STI_NOP, task.guest.vcpu.set_single_step(True), step to sti_nop_sti,
    #       step on, inject when ready, stop stepping, run to the sync point.
    raise NotImplementedError("TODO in inject_after_sti() (sheet.md, step 1)")


def mov_ss_steps(task) -> list:
    """Single-step Command.MOV_SS; the RIPs of the debug exits from the one at mov_ss_mov on."""
    # TODO (sheet.md, step 2)
    raise NotImplementedError("TODO in mov_ss_steps() (sheet.md, step 2)")


if __name__ == "__main__":
    from pykvm.labs.runner import check_here

    check_here(6, __file__)
