"""Deadlines for calls that wait on a guest: past its deadline, a call is cancelled.

Why this exists: a guest command that waits for an interrupt (``hlt`` with an
in-kernel irqchip, ``WAIT_LOG``) blocks inside ``KVM_RUN`` until the interrupt
comes. If it never comes, because the host does not deliver it or a test is
wrong, the call must end with an error, never hang. One daemon thread keeps
the deadlines of all pending calls and, when one passes, calls its ``expire``
(for a guest session: kick the vCPU out of ``KVM_RUN``). A single long-lived
thread, rather than a timer per call, keeps a call cheap and the process's
thread count steady.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
import warnings
from collections.abc import Callable


class Watchdog:
    """Deadlines, each with the callback that cancels its call: ``with watchdog.guard(5, cancel):``."""

    def __init__(self) -> None:
        self._deadlines: dict[int, tuple[float, Callable[[], None]]] = {}
        self._tokens = itertools.count()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self.failures: collections.deque[BaseException] = collections.deque(maxlen=16)

    def guard(self, seconds: float, expire: Callable[[], None]) -> _Guard:
        """A context manager: ``expire()`` is called if its block is still running after ``seconds``."""
        return _Guard(self, seconds, expire)

    def _add(self, seconds: float, expire: Callable[[], None]) -> int:
        with self._changed:
            token = next(self._tokens)
            self._deadlines[token] = (time.monotonic() + seconds, expire)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="pykvm-watchdog", daemon=True)
                self._thread.start()
            self._changed.notify()
            return token

    def _remove(self, token: int) -> None:
        with self._changed:
            self._deadlines.pop(token, None)

    def _watch(self) -> None:
        while True:
            with self._changed:
                now = time.monotonic()
                due = [token for token, (deadline, _) in self._deadlines.items() if deadline <= now]
                expired = [self._deadlines.pop(token)[1] for token in due]
                if not expired:
                    upcoming = min((deadline for deadline, _ in self._deadlines.values()), default=None)
                    self._changed.wait(None if upcoming is None else max(0.0, upcoming - now))
                    continue
            for expire in expired:          # outside the lock: a callback may take its time
                self._expire(expire)

    def _expire(self, expire: Callable[[], None]) -> None:
        """Call one callback; one that raises is reported and kept, and the watchdog goes on."""
        try:
            expire()
        except Exception as exc:
            self.failures.append(exc)
            warnings.warn(f"pykvm watchdog: a deadline callback raised {type(exc).__name__}: {exc}",
                          RuntimeWarning, stacklevel=1)


class _Guard:
    def __init__(self, watchdog: Watchdog, seconds: float, expire: Callable[[], None]) -> None:
        self._watchdog, self._seconds, self._expire = watchdog, seconds, expire

    def __enter__(self) -> None:
        self._token = self._watchdog._add(self._seconds, self._expire)

    def __exit__(self, *exc_info) -> None:
        self._watchdog._remove(self._token)


WATCHDOG = Watchdog()
