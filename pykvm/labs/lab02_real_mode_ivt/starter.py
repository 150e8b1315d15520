"""Lab 2: The real-mode IVT. Read sheet.md first; fill in the TODOs; check with `python lab.py` in this folder.

The checker calls handler_source(task) and then solve(task) in a child process;
task.vm and task.vcpu belong to the checker (do not close them).
"""

import pykvm  # noqa: F401  (pykvm.assemble, pykvm.HltExit)


def handler_source(task) -> str:
    """16-bit GNU assembly of your handler for task.vector (assembled at offset 0)."""
    return f"""
        # TODO: report the interrupted IP with `out %ax, ${task.report_port:#x}`, then return
        #       to the interrupted code (sheet: 'The frame').
        hlt
    """


def solve(task) -> None:
    """Load the handler, point IVT entry task.vector at it, inject task.vector once, run to the hlt."""
    print("task:", task)
    # TODO 1: assemble handler_source(task) for real mode and write it at task.handler_address.
    # TODO 2: write IVT entry task.vector (offset, then segment) in guest memory.
    # TODO 3: run task.vcpu; after an exit that reports ready_for_interrupt_injection,
    #         inject task.vector (once); stop at the HltExit.
    raise NotImplementedError("TODO 1-3 in solve(): load the handler, fill the IVT entry, inject (sheet.md)")


if __name__ == "__main__":
    from pykvm.labs.runner import check_here

    check_here(2, __file__)
