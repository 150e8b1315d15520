"""Lab 1: First VM. Read sheet.md first; fill in the TODOs; check with `python lab.py` in this folder.

The checker calls solve(task) in a child process with a random task and
watches what KVM does; what solve() returns is ignored.
"""

import pykvm  # noqa: F401  (you will need it)
from pykvm import x86  # noqa: F401  (x86.enter_real_mode is what step 3 needs)


def solve(task) -> None:
    """Run task.code in a new VM, answer its IN with task.answer, and run it to its hlt."""
    print("task:", task)
    # TODO 1: open /dev/kvm (pykvm.Kvm()), create a VM with memory_size=0 and add ONE
    #         memory slot of task.memory_size bytes at guest-physical address 0.
    # TODO 2: write task.code into guest memory at task.address.
    # TODO 3: create a vCPU; enter real mode with CS*16 + IP == task.address
    #         (CS and IP are 16-bit: 0..0xFFFF each).
    # TODO 4: loop over vcpu.run(): answer the IN from task.port with task.answer,
    #         continue past the OUT, stop at the HltExit.
    raise NotImplementedError("TODO 1-4 in solve(): create the VM, load the code, run it (sheet.md)")


if __name__ == "__main__":
    from pykvm.labs.runner import check_here

    check_here(1, __file__)
