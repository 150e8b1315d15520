"""Lab 3: exceptions in long mode. Read sheet.md first; fill in the TODOs; check with `python lab.py` in this folder.

The checker calls handlers_source(task), then solve(task), in a child process;
task.vm and task.vcpu belong to the checker (do not close them).
"""

import pykvm  # noqa: F401  (pykvm.assemble, pykvm.HltExit)
from pykvm import x86  # noqa: F401  (x86.enter_long_mode)


def handlers_source(task) -> str:
    """64-bit assembly with labels de_handler, gp_handler, pf_handler (assembled at task.handler_address)."""
    return f"""
de_handler:
        # TODO: AL=vector, RBX=error code (0: none), RCX=faulting RIP, then
        #       out %al, ${task.report_port:#x}; resume at RSI with iretq
        hlt
gp_handler:
        # TODO: as above; this one has an error code on the stack
        hlt
pf_handler:
        # TODO: as above, and RDX = CR2
        hlt
"""


def solve(task) -> None:
    """Load the handlers, enter long mode at task.entry with an IDT for 0, 13, 14, run to the hlt."""
    print("task:", task)
    # TODO 1: assemble handlers_source(task) for long mode at task.handler_address; write it there.
    # TODO 2: x86.enter_long_mode(task.vcpu, task.entry, handlers={vector: address, ...}).
    # TODO 3: run task.vcpu until the HltExit.
    raise NotImplementedError("TODO 1-3 in solve(): load the handlers, enter long mode, run (sheet.md)")


if __name__ == "__main__":
    from pykvm.labs.runner import check_here

    check_here(3, __file__)
