"""Lab 11 reference solution."""

import signal

from pykvm.core.vcpu import KICK_SIGNAL


def kick(vcpu, thread: int) -> None:
    vcpu.kvm_run.immediate_exit = 1          # first: a KVM_RUN not yet entered returns at once
    signal.pthread_kill(thread, KICK_SIGNAL)  # then: one already inside leaves the guest


def measure(task) -> dict:
    numbers = {}
    for path in ("kick", task.kernel_path):
        result = task.measure(path, task.state)
        print(path, task.state, result.row())
        numbers[path] = result.p50_us
    return numbers
