"""Deadlines for calls that wait on a guest: past its deadline, a call is cancelled.

Why this exists: a guest command that waits for an interrupt (``hlt`` with an
in-kernel irqchip, ``WAIT_LOG``) blocks inside ``KVM_RUN`` until the interrupt
comes. If it never comes, because the host does not deliver it or a test is
wrong, the call must end with an error, never hang. One daemon thread keeps
the deadlines of all pending calls and, when one passes, calls its ``expire``
(for a guest session: kick the vCPU out of ``KVM_RUN``). A single long-lived
thread, rather than a timer per call, keeps a call cheap and the process's
thread count steady.

A deadline can pass just as its call ends. Leaving the guarded block therefore
waits for an ``expire`` already running, and the guard's ``fired`` says whether
it ran, so the caller can undo what it did to a call that had ended anyway (a
session clears its ``cancelled`` flag); an ``expire`` never runs after the block.
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
        self._expiring: set[int] = set()            # tokens whose callback is running now
        self._tokens = itertools.count()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)     # a deadline was added: the watcher looks again
        self._expired = threading.Condition(self._lock)     # a callback returned
        self._thread: threading.Thread | None = None
        self.failures: collections.deque[BaseException] = collections.deque(maxlen=16)

    def guard(self, seconds: float, expire: Callable[[], None]) -> _Guard:
        """A context manager: ``expire()`` is called if its block is still running after ``seconds``."""
        return _Guard(self, seconds, expire)

    def _add(self, seconds: float, expire: Callable[[], None]) -> int:
        with self._lock:
            token = next(self._tokens)
            self._deadlines[token] = (time.monotonic() + seconds, expire)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="pykvm-watchdog", daemon=True)
                self._thread.start()
            self._changed.notify()
            return token

    def _remove(self, token: int) -> bool:
        """Take the deadline out; True if it had passed, and then once its callback has returned."""
        with self._lock:
            if self._deadlines.pop(token, None) is not None:
                return False
            if threading.current_thread() is not self._thread:     # a callback's own guard: no self-wait
                while token in self._expiring:
                    self._expired.wait()
            return True

    def _watch(self) -> None:
        while True:
            with self._lock:
                now = time.monotonic()
                due = [token for token, (deadline, _) in self._deadlines.items() if deadline <= now]
                expired = [(token, self._deadlines.pop(token)[1]) for token in due]
                self._expiring.update(due)
                if not expired:
                    upcoming = min((deadline for deadline, _ in self._deadlines.values()), default=None)
                    self._changed.wait(None if upcoming is None else max(0.0, upcoming - now))
                    continue
            for token, expire in expired:          # outside the lock: a callback may take its time
                try:
                    self._expire(expire)
                finally:
                    with self._lock:
                        self._expiring.discard(token)
                        self._expired.notify_all()

    def _expire(self, expire: Callable[[], None]) -> None:
        """Call one callback; one that raises is reported and kept, and the watchdog goes on."""
        try:
            expire()
        except Exception as exc:
            self.failures.append(exc)
            warnings.warn(f"pykvm watchdog: a deadline callback raised {type(exc).__name__}: {exc}",
                          RuntimeWarning, stacklevel=1)


class _Guard:
    """One deadline; after its block, :attr:`fired` says whether ``expire`` was called (it has returned)."""

    def __init__(self, watchdog: Watchdog, seconds: float, expire: Callable[[], None]) -> None:
        self._watchdog, self._seconds, self._expire = watchdog, seconds, expire
        self.fired = False

    def __enter__(self) -> None:
        self._token = self._watchdog._add(self._seconds, self._expire)

    def __exit__(self, *exc_info) -> None:
        self.fired = self._watchdog._remove(self._token)


WATCHDOG = Watchdog()
