"""Lab 11, wrong: kicks with the signal alone, never asking KVM_RUN to exit (no immediate_exit)."""

import signal

from pykvm.core.vcpu import KICK_SIGNAL

# What the checker must say: [(the 1-based step that fails, a phrase its reason contains), ...]; any one.
EXPECTED_FAILURES = [(2, "the kick was lost")]


def kick(vcpu, thread: int) -> None:
    signal.pthread_kill(thread, KICK_SIGNAL)


def measure(task) -> dict:
    return {path: task.measure(path, task.state).p50_us for path in ("kick", task.kernel_path)}
