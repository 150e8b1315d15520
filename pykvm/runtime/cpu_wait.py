"""Deadlines for guest events that excuse the time this process waited for a CPU.

Why this exists: a wait for something a guest or a vCPU thread must do (an
interrupt delivered, an AP halted, a kicked vCPU leaving ``KVM_RUN``) takes
microseconds to milliseconds when the threads involved run; on a loaded host
it can miss any wall-clock bound only because they were not running. Giving
such waits seconds of slack made every negative case (a wrong solution, a
lost kick) cost those seconds. A :class:`CpuFairDeadline` is short instead,
and grows by the run delay that the kernel counted for this process's threads
meanwhile (``/proc/self/task/*/schedstat``, second field: nanoseconds spent
runnable but waiting for a CPU), so a starved host is told apart from an event
that never comes.

Example (no KVM needed)::

    >>> deadline = CpuFairDeadline(0.05)
    >>> while not deadline.expired():
    ...     time.sleep(0.01)
    >>> deadline.describe().startswith("0.05 s (plus ")
    True
"""

from __future__ import annotations

import contextlib
import os
import time

from ..core import checks


def waited_for_a_cpu() -> float:
    """Seconds this process's threads have waited for a CPU, summed (``/proc/self/task/*/schedstat``'s
    run delay); 0 where the kernel does not say."""
    total = 0
    with contextlib.suppress(OSError):
        for task in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError, ValueError, IndexError), \
                    open(f"/proc/self/task/{task}/schedstat") as schedstat:
                total += int(schedstat.read().split()[1])
    return total / 1e9


class CpuFairDeadline:
    """``seconds`` from now, plus the time this process's threads wait for a CPU until it expires.

    The CPU wait is read only when the wall-clock part has run out (listing
    ``/proc/self/task`` at every poll would itself take the CPU a starved
    thread waits for), so polling :meth:`expired` or :meth:`remaining` is cheap.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = checks.seconds("seconds", seconds, "how long the awaited event may take on a host that runs it")
        self._started = time.monotonic()
        self._queued_before = waited_for_a_cpu()
        self.starved = 0.0               # seconds of CPU wait excused so far

    def remaining(self) -> float:
        """Seconds left, >= 0."""
        left = self._started + self.seconds + self.starved - time.monotonic()
        if left <= 0:
            self.starved = waited_for_a_cpu() - self._queued_before
            left = self._started + self.seconds + self.starved - time.monotonic()
        return max(left, 0.0)

    def expired(self) -> bool:
        return self.remaining() == 0.0

    def describe(self) -> str:
        """The bound as a reason says it: ``"1 s (plus 0.00 s this process's threads waited for a CPU)"``."""
        return f"{self.seconds:g} s (plus {self.starved:.2f} s this process's threads waited for a CPU)"
