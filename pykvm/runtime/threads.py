"""Several vCPUs at once: one thread per vCPU, with stops that cannot hang.

Why this exists: with an in-kernel irqchip a vCPU blocks inside ``KVM_RUN``
(a halted guest waits there for an interrupt), so an SMP test needs each vCPU
in its own thread, and a test that goes wrong must still end. Every join here
is bounded: past the deadline the vCPU is kicked (``vcpu.kick()``), and if
its thread still does not stop, :class:`VcpuThreadError` names the vCPU.
A thread that dies with an exception is reported the same way.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from ..core import checks
from ..core.errors import ArgumentTypeError, GuestCancelled, VcpuThreadError
from ..core.exits import Exit
from ..core.vcpu import Vcpu
from .cpu_wait import CpuFairDeadline, ThreadCpuDeadline

KICK_GRACE = 1.0     # seconds a kicked vCPU thread gets to leave KVM_RUN and finish


class VcpuThread:
    """Runs ``target(stopping)`` in a thread on behalf of ``vcpu``; :meth:`result` joins with a bound.

    ``stopping`` is a :class:`threading.Event` set by :meth:`stop`; a target that
    loops over ``vcpu.run()`` checks it after every exit.
    """

    def __init__(self, vcpu: Vcpu, target: Callable[[threading.Event], Any], name: str = "") -> None:
        checks.instance("vcpu", vcpu, Vcpu, "the vCPU the thread runs, e.g. vm.vcpus[0]")
        if not callable(target):
            raise ArgumentTypeError(f"target={checks.shown(target)}: expected a callable taking the "
                                    f"stopping Event")
        self.vcpu = vcpu
        self.stopping = threading.Event()
        self._target = target
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True,
                                        name=name or f"pykvm-vcpu-{vcpu.id}")
        self._thread.start()

    def _main(self) -> None:
        try:
            self._value = self._target(self.stopping)
        except BaseException as exc:      # reported by result()
            self._error = exc

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        """Ask the thread to stop: set ``stopping`` and kick the vCPU out of KVM_RUN."""
        self.stopping.set()
        cancel = getattr(self._target, "cancel", None)
        if cancel is not None:
            cancel()
        else:
            self.vcpu.kick()

    def cancel(self, timeout: float = KICK_GRACE) -> None:
        """Stop the thread on purpose (kick) and wait up to ``timeout`` s for it to end."""
        checks.seconds("timeout", timeout, "how long the kicked thread gets to end")
        self.stop()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise VcpuThreadError(f"vCPU {self.vcpu.id} did not stop within {timeout:.2g} s of a kick")
        if self._error is not None and not isinstance(self._error, GuestCancelled):
            raise VcpuThreadError(f"the thread of vCPU {self.vcpu.id} died: "
                                  f"{type(self._error).__name__}: {self._error}") from self._error

    def result(self, timeout: float | CpuFairDeadline | ThreadCpuDeadline = 5.0) -> Any:
        """Wait up to ``timeout`` s (or until a :mod:`~pykvm.runtime.cpu_wait` deadline) for the target's return
        value; then kick, then give up loudly."""
        if isinstance(timeout, (CpuFairDeadline, ThreadCpuDeadline)):
            while self._thread.is_alive() and (left := timeout.remaining()):
                self._thread.join(left)
            bound = timeout.describe()
        else:
            checks.seconds("timeout", timeout, "every join is bounded: pass how long to wait for the vCPU's thread")
            self._thread.join(timeout)
            bound = f"{timeout:.2g} s"
        if self._thread.is_alive():
            self.stop()
            self._thread.join(KICK_GRACE)
            state = ("did not stop even after a kick; its thread is left running as a daemon"
                     if self._thread.is_alive() else "was stopped with a kick")
            raise VcpuThreadError(f"vCPU {self.vcpu.id} did not finish within {bound} and {state}") from self._error
        if self._error is not None:
            raise VcpuThreadError(f"the thread of vCPU {self.vcpu.id} died: "
                                  f"{type(self._error).__name__}: {self._error}") from self._error
        return self._value


class _SessionCommand:
    """A guest command run to its next sync point, cancellable from another thread."""

    def __init__(self, session, command, arg: int, arg2: int) -> None:
        self.session, self.command, self.arg, self.arg2 = session, command, arg, arg2

    def __call__(self, stopping: threading.Event):
        return self.session.command(self.command, self.arg, self.arg2)

    def cancel(self) -> None:
        self.session.cancel()


def command_in_thread(session, command, arg: int = 0, arg2: int = 0) -> VcpuThread:
    """Run ``session.command(...)`` on its own thread; ``.result(timeout)`` gives the GuestStop."""
    return VcpuThread(session.vcpu, _SessionCommand(session, command, arg, arg2))


def run_vcpus(vcpus: Iterable, handler: Callable[[Any, Exit], bool], timeout: float = 10.0) -> list[int]:
    """Run every vCPU in its own thread until ``handler(vcpu, exit)`` returns True for it.

    Returns the number of exits each vCPU made. Raises :class:`VcpuThreadError`
    naming the vCPUs whose handler raised or that had not stopped by ``timeout``
    (those are kicked and stopped first, so nothing is left in KVM_RUN).
    """
    if not callable(handler):
        raise ArgumentTypeError(f"handler={checks.shown(handler)}: expected a callable "
                                f"handler(vcpu, exit) -> bool")
    checks.seconds("timeout", timeout, "every vCPU thread is stopped by then")
    checks.instance("vcpus", vcpus, Iterable, "e.g. vm.vcpus")
    vcpus = list(vcpus)
    for index, vcpu in enumerate(vcpus):
        checks.instance(f"vcpus[{index}]", vcpu, Vcpu, "the vCPUs to run, e.g. vm.vcpus")

    def loop(vcpu, stopping: threading.Event) -> int:
        exits = 0
        while not stopping.is_set():
            exit = vcpu.run()
            exits += 1
            if handler(vcpu, exit):
                break
        return exits

    threads = [VcpuThread(vcpu, functools.partial(loop, vcpu)) for vcpu in vcpus]
    deadline = time.monotonic() + timeout
    results, failures = [], []
    for thread in threads:
        try:
            results.append(thread.result(max(0.0, deadline - time.monotonic())))
        except VcpuThreadError as exc:
            failures.append(str(exc))
            results.append(-1)
    if failures:
        for thread in threads:          # leave no sibling running once one failed
            if thread.running:
                thread.stop()
        raise VcpuThreadError("; ".join(failures))
    return results
