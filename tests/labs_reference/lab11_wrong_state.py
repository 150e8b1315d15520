"""Lab 11, wrong: measures a spinning target whatever state the task asks for."""

import signal

from pykvm.core.vcpu import KICK_SIGNAL

# What the checker must say: [(the 1-based step that fails, a phrase its reason contains), ...]; any one.
EXPECTED_FAILURES = [(4, "a measurement of state 'spinning'"), (5, "a measurement of state 'spinning'")]


def kick(vcpu, thread: int) -> None:
    vcpu.kvm_run.immediate_exit = 1
    signal.pthread_kill(thread, KICK_SIGNAL)


def measure(task) -> dict:
    return {path: task.measure(path, "spinning").p50_us for path in ("kick", task.kernel_path)}
