"""Lab 11: Kicking a running vCPU. Read sheet.md first; fill in the TODOs; check with `python lab.py` in this folder."""

import signal  # noqa: F401

from pykvm.core.vcpu import KICK_SIGNAL  # noqa: F401


def kick(vcpu, thread: int) -> None:
    """Make vcpu's KVM_RUN on thread `thread` (a threading ident) return now, or at once if not entered yet."""
    # TODO (sheet.md, steps 1 and 2): two things, and the order matters; the checker has installed
    #      pykvm's handler for KICK_SIGNAL (pykvm.core.vcpu.install_kick_handler()).
    raise NotImplementedError("TODO: kick() (sheet.md, steps 1 and 2)")


def measure(task) -> dict:
    """{"kick": p50 us, task.kernel_path: p50 us}, both measured with the target vCPU in task.state."""
    print("task:", task)
    # TODO (sheet.md, step 3): task.measure(path, state) is pykvm.hosts.delivery_latency.measure with
    #      this run's KVM and task.count; it returns a PathMeasurement (p50_us, host_p50_us, counters, ...).
    #      Print what you need to answer the questions.
    raise NotImplementedError("TODO: measure() (sheet.md, step 3)")


if __name__ == "__main__":
    from pykvm.labs.runner import check_here

    check_here(11, __file__)
