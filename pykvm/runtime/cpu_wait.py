"""Deadlines for guest events that excuse the time this process waited for a CPU.

Why this exists: a wait for something a guest or a vCPU thread must do (an
interrupt delivered, an AP halted, a kicked vCPU leaving ``KVM_RUN``) takes
microseconds to milliseconds when the threads involved run; on a loaded host
it can miss any wall-clock bound only because they were not running. Giving
such waits seconds of slack made every negative case (a wrong solution, a
lost kick) cost those seconds. Two short deadlines instead, from the kernel's
per-thread scheduler statistics (``/proc/self/task/TID/schedstat``: nanoseconds
on a CPU, then nanoseconds runnable but waiting for one):

- :class:`CpuFairDeadline` grows by the run delay of this process's threads
  meanwhile, for waits where no thread of the process spins;
- :class:`ThreadCpuDeadline` expires once one thread, the one that must act
  (a vCPU thread spinning in its guest, say), has had so much CPU time: a spinning
  thread keeps waiting for a CPU as long as it spins on a loaded host, so only
  its own CPU time tells a lost kick from a starved one.

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


def _schedstat(task: int | str, process: int | str = "self") -> tuple[int, int] | None:
    """``/proc/PROCESS/task/TASK/schedstat``: (ns on a CPU, ns runnable but waiting for one); None once it ended."""
    try:
        with open(f"/proc/{process}/task/{task}/schedstat") as schedstat:
            ran, waited = schedstat.read().split()[:2]
        return int(ran), int(waited)
    except (OSError, ValueError):
        return None


def scheduled(process: int | str = "self") -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) of process ``process``'s living threads,
    summed (``/proc/PROCESS/task/*/schedstat``); zeros where the kernel does not say."""
    ran = waited = 0
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{process}/task"):
            if (times := _schedstat(task, process)) is not None:
                ran += times[0]
                waited += times[1]
    return ran / 1e9, waited / 1e9


def waited_for_a_cpu() -> float:
    """Seconds this process's threads have waited for a CPU, summed (``/proc/self/task/*/schedstat``'s
    run delay); 0 where the kernel does not say."""
    return scheduled()[1]


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


class ThreadCpuDeadline:
    """Until the thread ``native_id`` (``threading.get_native_id()``) of this process has run ``seconds`` more
    of CPU time, or has ended; in any case after ``limit`` seconds of wall time.

    Inside ``KVM_RUN`` guest time counts as the thread's CPU time: a vCPU thread
    that has run ``seconds`` since a kick and is still in its guest lost the kick.
    """

    def __init__(self, native_id: int, seconds: float, limit: float = 30.0) -> None:
        self.native_id = native_id
        self.seconds = checks.seconds("seconds", seconds, "the CPU time the thread gets to act")
        self.limit = checks.seconds("limit", limit, "the wall-clock bound, whatever the thread gets")
        self._started = time.monotonic()
        self._ran_before = self._ran()

    def _ran(self) -> float | None:
        """The thread's CPU time so far; None once it has ended."""
        times = _schedstat(self.native_id)
        return None if times is None else times[0] / 1e9

    def ran(self) -> float:
        """The thread's CPU time since the deadline began (0 if it ended before)."""
        now, before = self._ran(), self._ran_before
        return 0.0 if now is None or before is None else now - before

    def remaining(self) -> float:
        """Seconds to wait before looking again, >= 0 (0: expired)."""
        wall_left = self._started + self.limit - time.monotonic()
        if wall_left <= 0 or self._ran() is None:
            return 0.0
        return max(0.0, min(wall_left, self.seconds - self.ran()))

    def expired(self) -> bool:
        return self.remaining() == 0.0

    def describe(self) -> str:
        """The bound as a reason says it."""
        waited = time.monotonic() - self._started
        return f"{self.seconds:g} s of its thread's CPU time ({self.ran():.2f} s run in {waited:.2f} s)"

