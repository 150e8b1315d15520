"""CPU-fair deadlines (pykvm.runtime.cpu_wait): the CPU wait they excuse is measured, and they grow by it."""

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from pykvm.core.errors import InvalidArgument
from pykvm.runtime.cpu_wait import CpuFairDeadline, waited_for_a_cpu

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
        deadline = CpuFairDeadline(0.4)
        wall, off_cpu = _spin(deadline.expired)
    assert 0.9 * off_cpu - 0.02 <= deadline.starved <= off_cpu + 0.1, (deadline.starved, off_cpu)
    ended = 0.4 + deadline.starved         # when the deadline says it ended, after its start
    assert ended <= wall + 0.001 <= ended + 0.1 + off_cpu / 10, (wall, deadline.starved)
    if rival:
        assert deadline.starved > 0.1, deadline.describe()
    assert deadline.describe().startswith("0.4 s (plus ")


@pytest.mark.parametrize("seconds", [0, -1, float("inf"), float("nan")])
def test_a_deadline_needs_finite_positive_seconds(seconds):
    with pytest.raises(InvalidArgument, match="seconds=.*finite number of seconds > 0"):
        CpuFairDeadline(seconds)
