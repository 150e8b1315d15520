"""The times the host did not run this process: what a timing test may not blame on KVM.

Why this exists: a guest cannot take a timer tick while its host does not run
it, and KVM keeps at most one LAPIC timer tick pending (a tick that expires
while the last one waits to be injected is dropped, ``apic_timer_expired()``).
On a loaded host, and most of all under an emulator whose whole machine waits
for a host CPU (``python -m pykvm.hosts tcg-amd``), the guest's clock moves on
while nothing runs, and periodic ticks are lost for a reason that is the
host's. :class:`HostStalls` measures those times in the same run, so a test
can excuse exactly the ticks that fell in them and still fail a timer that is
slow when the host ran it.

It is a thread that sleeps ``step`` seconds at a time and records every wake
that came more than ``threshold`` after the one before: while the host (or the
emulator under it) ran nothing of this process, that thread did not run
either. With one emulated CPU shared by all threads, as under QEMU's
single-threaded TCG, a stall of the vCPU thread is a stall of the monitor too.
While it watches, the interpreter's thread switch interval is lowered to half
a step (from 5 ms by default), or a thread running Python code would keep the
monitor from the GIL for milliseconds that are no stall of the host (measured
on kvm_pvm: two "stalls" of 4-5 ms while a guest command ran, at 5 ms).

Example (any host)::

    with HostStalls(threshold=0.001) as stalls:
        time.sleep(0.05)
    print(stalls.intervals)        # [(start, end), ...] in time.perf_counter() seconds
"""

from __future__ import annotations

import sys
import threading
import time
from types import TracebackType

from ..core.errors import InvalidArgument


class HostStalls:
    """A context that records the gaps over ``threshold`` seconds in a thread waking every ``step`` seconds."""

    def __init__(self, threshold: float, step: float = 0.0002) -> None:
        if not 0 < step < threshold:
            raise InvalidArgument(f"HostStalls(threshold={threshold!r}, step={step!r}): expected "
                                  f"0 < step < threshold; a stall is a gap longer than several steps")
        self.threshold = threshold
        self.step = step
        self.intervals: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._switch_interval = sys.getswitchinterval()
        self._thread = threading.Thread(target=self._watch, name="pykvm-host-stalls", daemon=True)

    def _watch(self) -> None:
        last = time.perf_counter()
        while not self._stop.wait(self.step):
            now = time.perf_counter()
            if now - last > self.threshold:
                self.intervals.append((last, now))
            last = now

    def __enter__(self) -> HostStalls:
        sys.setswitchinterval(min(self._switch_interval, self.step / 2))
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        sys.setswitchinterval(self._switch_interval)

    def covering(self, moments: list[float], margin: float) -> int:
        """How many of ``moments`` (perf_counter seconds) lie in a stall widened by ``margin`` at each end."""
        return sum(any(start - margin <= moment <= end + margin for start, end in self.intervals)
                   for moment in moments)
