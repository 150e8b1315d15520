"""Lab 14: KVM's requests. Read sheet.md first; fill in the TODOs; check with `python lab.py` in this folder.

The checker asks for two requests per run. For each it builds a VM with a
small guest looping on `rdmsr` and `out`, stops it at the `out`, and calls
trigger(task); then it runs the guest itself and measures what moved.
task.vm and task.vcpu belong to the checker (do not close them, do not run the vCPU).
"""

from pykvm import Cap  # noqa: F401
from pykvm.core.constants import MsrFilterAccess, VcpuEventValid  # noqa: F401  (KVM_MSR_FILTER_*, KVM_VCPUEVENT_VALID_*)
from pykvm.core.state import MsrFilterRange  # noqa: F401  (a range of KVM_X86_SET_MSR_FILTER)


def trigger(task) -> None:
    """Do the host action that makes KVM raise KVM_REQ_<task.name> on task.vcpu.

    task.name: EVENT, NMI, TLB_FLUSH, TRIPLE_FAULT, MSR_FILTER_CHANGED or CLOCK_UPDATE;
    task.vector: the guest has a handler for it (and for the NMI); task.msr: the MSR the guest reads.
    """
    print("task:", task)
    # TODO: one host action per request name: `python -m pykvm.requests show NAME` prints it.
    raise NotImplementedError("TODO in trigger(): the host action for each request (sheet.md, Steps)")


def evidence(name) -> str:
    """Which evidence KVM_REQ_<name> leaves: one of the names in sheet.md, 'Evidence'."""
    # TODO: predict it; the checker compares it with what it measured in your run.
    raise NotImplementedError("TODO in evidence(): name the evidence (sheet.md, Evidence)")


if __name__ == "__main__":
    from pykvm.labs.runner import check_here

    check_here(14, __file__)
