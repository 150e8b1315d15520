"""Running an emulator: stream its serial console to the caller, enforce the deadline, always kill it.

Why this exists: both hosts boot a guest in an emulator (QEMU, Bochs) whose
serial console carries the command's output and exit status. :func:`boot`
starts the emulator, reads the console (QEMU's stdout, or the FIFO Bochs
writes COM1 into) through a :class:`~.console.ConsoleFilter`, stops once the
guest has reported or can run nothing more, kills the emulator whatever
happens, and turns a run that reported no status into
:class:`~.errors.GuestFailed` with the console's tail.
"""

from __future__ import annotations

import os
import selectors
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import BinaryIO

from .console import ConsoleFilter, Markers
from .errors import GuestFailed, GuestTimeout
from .tools import say

_POLL_SECONDS = 0.5


def boot(command: Sequence[str], markers: Markers, timeout: float, output: BinaryIO, host: str, *,
         console_fd: int | None = None, grace: float = 5.0, emulator_log: Callable[[], str] | None = None,
         slow_hint: str = "", known_aborts: Mapping[str, str] | None = None) -> int:
    """Run the emulator ``command``, stream the command's output to ``output``, return its exit status.

    The console is the emulator's stdout, or ``console_fd`` (a FIFO the emulator
    writes into, opened read-write so it never reports EOF). Once the guest has
    reported (or panicked, or powered off) the emulator gets ``grace`` seconds to
    exit by itself before it is killed. ``host`` names the guest in errors;
    ``emulator_log`` gives the emulator's own log for them, ``slow_hint`` what to
    say on a timeout, and ``known_aborts`` what is known of an emulator that
    stopped saying one of its keys (a message of its own, not the guest's).
    """
    console = ConsoleFilter(markers)
    begin = time.monotonic()
    deadline = begin + timeout
    with tempfile.TemporaryFile() as emulator_stderr:
        emulator = subprocess.Popen(list(command), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE if console_fd is None else subprocess.DEVNULL,
                                    stderr=emulator_stderr)
        try:
            fd = console_fd if console_fd is not None else emulator.stdout.fileno()  # type: ignore[union-attr]
            started = _pump(emulator, fd, console, deadline, output)
            if console.finished:
                emulator.wait(timeout=max(0.0, min(grace, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            pass
        finally:
            if emulator.poll() is None:
                emulator.kill()
            emulator.wait()
        if started is not None:
            say(f"{host}: the command started {started - begin:.0f} s after boot and ran "
                f"{time.monotonic() - started:.0f} s")
        if console.exit_status is not None:
            return console.exit_status
        if time.monotonic() >= deadline:
            raise GuestTimeout(f"the {host} guest did not finish within {timeout:g} s; the emulator "
                               f"was killed. {slow_hint or 'Raise --timeout if the command is just slow'}",
                               console.tail)
        emulator_stderr.seek(0)
        errors = emulator_stderr.read().decode(errors="replace").strip()
        if emulator_log is not None:
            errors = "\n".join(part for part in (errors, emulator_log()) if part)
        known = [why for said, why in (known_aborts or {}).items() if said in errors]
        if known:
            reason = f"the emulator itself failed, not the guest: {known[0]}"
        elif console.error:
            reason = f"/init failed: {console.error}"
        elif not console.started:
            reason = "the guest stopped before running the command (kernel panic or emulator error?)"
        else:
            reason = "the guest stopped while the command ran (kernel panic?)"
        raise GuestFailed(f"the {host} guest reported no exit status: {reason}; the emulator exited "
                          f"with {emulator.returncode}" + (f", saying: {errors}" if errors else ""),
                          console.tail)


def _pump(emulator: subprocess.Popen, fd: int, console: ConsoleFilter, deadline: float,
          output: BinaryIO) -> float | None:
    """Copy the console ``fd`` through ``console`` to ``output`` until the guest finished, the
    emulator died, EOF or the deadline; return when the command started (None: it did not)."""
    started = None
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while not console.finished and (remaining := deadline - time.monotonic()) > 0:
            if not selector.select(min(remaining, _POLL_SECONDS)):
                if emulator.poll() is not None:
                    break
                continue
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if not data:
                break
            passed = console.feed(data)
            if started is None and console.started:
                started = time.monotonic()
            if passed:
                output.write(passed)
                output.flush()
    return started
