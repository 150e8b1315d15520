"""Deadlines of pykvm.runtime.cpu_wait: the CPU wait a CpuFairDeadline excuses is measured and it grows by it; a
ThreadCpuDeadline counts one thread's CPU time, not the wall time."""

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from pykvm.core.errors import InvalidArgument
from pykvm.runtime.cpu_wait import CpuFairDeadline, ThreadCpuDeadline, waited_for_a_cpu

pytestmark = pytest.mark.host_independent


@contextmanager
def _one_cpu(rival: bool) -> Iterator[None]:
    """This thread on one CPU, shared (``rival``) with a process that spins on it, or not."""
    allowed = os.sched_getaffinity(0)
    cpu = min(allowed)
    os.sched_setaffinity(0, {cpu})          # this thread only
    program = f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"
    spinner = subprocess.Popen([sys.executable, "-c", program]) if rival else None
    try:
        time.sleep(0.1)                                         # its interpreter is up and spinning
        yield
    finally:
        os.sched_setaffinity(0, allowed)
        if spinner is not None:
            spinner.kill()
            spinner.wait()


def _spin(until: Callable[[], bool]) -> tuple[float, float]:
    """Spin until ``until()``: the wall time it took, and this thread's time off the CPU meanwhile
    (wall time less its CPU time: a spinner never sleeps)."""
    cpu_before, started = time.thread_time(), time.monotonic()
    while not until():
        pass
    wall = time.monotonic() - started
    return wall, wall - (time.thread_time() - cpu_before)


def test_the_cpu_wait_is_measured_by_two_methods():
    """schedstat's run delay, cross-checked against a second measure of the same wait: a thread spinning beside
    a rival on one CPU is off it for its wall time less its CPU time (about half; more on a loaded host, and then
    both grow alike)."""
    with _one_cpu(rival=True):
        before, end = waited_for_a_cpu(), time.monotonic() + 0.6
        _, off_cpu = _spin(lambda: time.monotonic() > end)
        counted = waited_for_a_cpu() - before
    assert off_cpu > 0.15, off_cpu                             # the rival did take the CPU from it
    assert 0.9 * off_cpu <= counted <= off_cpu + 0.1, (counted, off_cpu)


@pytest.mark.parametrize("rival", [True, False], ids=["beside-a-rival", "alone"])
def test_a_deadline_grows_by_the_cpu_wait_it_counted(rival):
    """Beside a rival the spinner waits for its CPU and the deadline ends that much later; alone (the control)
    it ends after its seconds plus whatever wait the rest of the machine caused, which the deadline counts too."""
    with _one_cpu(rival):
        started = time.monotonic()
        deadline = CpuFairDeadline(0.4)
        _, off_cpu = _spin(deadline.expired)
        wall = time.monotonic() - started
    assert 0.9 * off_cpu - 0.02 <= deadline.starved <= off_cpu + 0.1, (deadline.starved, off_cpu)
    ended = 0.4 + deadline.starved         # when the deadline says it ended, after its start
    assert ended <= wall <= ended + 0.1 + off_cpu / 10, (wall, deadline.starved)
    if rival:
        assert deadline.starved > 0.1, deadline.describe()
    assert deadline.describe().startswith("0.4 s (plus ")


@pytest.mark.parametrize("seconds", [0, -1, float("inf"), float("nan")])
def test_a_deadline_needs_finite_positive_seconds(seconds):
    with pytest.raises(InvalidArgument, match="seconds=.*finite number of seconds > 0"):
        CpuFairDeadline(seconds)


def _spinner(stop: threading.Event, native_id: list[int], cpu: int | None) -> None:
    native_id.append(threading.get_native_id())
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})               # this thread only
    while not stop.is_set():
        pass


@pytest.mark.parametrize("rival", [False, True], ids=["alone", "beside-a-rival"])
def test_a_thread_cpu_deadline_ends_when_the_thread_has_run_its_seconds(rival):
    """A spinning thread gets 0.3 s of CPU: alone that takes about 0.3 s of wall time, beside a rival spinning on
    its CPU about twice that (the wall time does not matter, the thread's CPU time does)."""
    stop, native_id = threading.Event(), []
    cpu = min(os.sched_getaffinity(0))
    with _one_cpu(rival):
        thread = threading.Thread(target=_spinner, args=(stop, native_id, cpu))
        thread.start()
        try:
            while not native_id:
                time.sleep(0.001)
            started = time.monotonic()
            deadline = ThreadCpuDeadline(native_id[0], 0.3)
            while not deadline.expired():
                time.sleep(0.01)
            wall, ran = time.monotonic() - started, deadline.ran()
        finally:
            stop.set()
            thread.join()
    assert 0.3 <= ran < 0.4 and ran <= wall + 0.01, (ran, wall)
    if rival:
        assert wall > 0.45, deadline.describe()             # it shared its CPU


def test_a_thread_cpu_deadline_waits_for_a_sleeping_thread_until_its_limit_and_ends_with_the_thread():
    """The control: a thread that does not run never uses its CPU seconds; the wall-clock limit ends the wait.
    A thread that has ended has nothing left to do: expired at once."""
    stop = threading.Event()
    native_id: list[int] = []
    thread = threading.Thread(target=lambda: (native_id.append(threading.get_native_id()), stop.wait()))
    thread.start()
    while not native_id:
        time.sleep(0.001)
    started = time.monotonic()
    deadline = ThreadCpuDeadline(native_id[0], 0.1, limit=0.3)
    while not deadline.expired():
        time.sleep(0.01)
    assert 0.3 <= time.monotonic() - started < 0.5 and deadline.ran() < 0.01
    stop.set()
    thread.join()                      # the OS thread ends a moment after join() returns
    gone = time.monotonic() + 5
    while os.path.exists(f"/proc/self/task/{native_id[0]}") and time.monotonic() < gone:
        time.sleep(0.001)
    assert ThreadCpuDeadline(native_id[0], 10.0).expired()
