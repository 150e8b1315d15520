"""A Ctrl-C while a pykvm command is still importing pykvm: status 130 and one line, no traceback.

Why this exists: importing a command's modules takes a tenth of a second or
more (``pykvm.boot``: the binding, the VMM's devices, the CPU models), and a
command's own handling of Ctrl-C (:func:`pykvm.exit_status.run_command`) starts only
once its ``main()`` runs. A ``KeyboardInterrupt`` raised inside an import before then reaches the
interpreter, which prints a traceback and kills the process with SIGINT.

The package's ``__init__`` imports this module before anything heavy, which
calls :func:`guard_imports`: when this process is ``python -m NAME`` for a
NAME in :data:`COMMANDS` (or ``pykvm X`` for such a ``pykvm.X``:
:mod:`pykvm.command` calls it again with the name), SIGINT ends it at once
with status 130 and "PROG: interrupted" on stderr, until the command calls
:func:`imports_done` from inside its ``run_command`` body, which gives
Ctrl-C back to Python. No VM exists yet while the guard is up, so there is
nothing to close. A program that imports pykvm, or runs another command, is
left alone.

Not covered: a Ctrl-C before the interpreter has begun importing pykvm (its
own start-up, ``site``, ``runpy``), which Python handles itself: before it
installs its SIGINT handler the process dies by the signal (which a shell
reports as 130 too), after it Python prints a traceback. This module imports
only what the interpreter has already loaded, so the guard is up within
microseconds of pykvm's first line.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

EXIT_INTERRUPTED = 128 + signal.SIGINT      # 130, what a shell reports for Ctrl-C; pykvm.exit_status uses it too
COMMANDS = ("pykvm.boot",)      # each calls imports_done() first thing in its run_command body


def running_command() -> str | None:
    """The module this process runs with ``python -m``, while it is being imported (else None)."""
    if sys.argv[:1] != ["-m"]:           # "-m" stays in argv[0] until the module is found and run
        return None
    arguments = iter(sys.orig_argv[1:])
    for argument in arguments:
        if argument == "-m":
            return next(arguments, None)
        if argument.startswith("-m"):
            return argument[2:]
    return None


class _Guard:
    """The SIGINT handler while the imports run: a line on stderr, then exit 130 at once."""

    def __init__(self, prog: str) -> None:
        self.prog = prog

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        try:
            os.write(2, f"\n{self.prog}: interrupted\n".encode())
        finally:
            os._exit(EXIT_INTERRUPTED)


def guard_imports(command: str | None = None) -> None:
    """If ``command`` (by default what ``python -m`` runs) is one of :data:`COMMANDS`, make SIGINT exit 130
    until :func:`imports_done`; the ``pykvm`` console command (:mod:`pykvm.command`) names its tool."""
    command = command or running_command()
    if command not in COMMANDS or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return                           # not ours, or SIGINT ignored or handled by someone else
    signal.signal(signal.SIGINT, _Guard(command.replace(".", " ")))


def imports_done() -> None:
    """Give Ctrl-C back to Python (a ``KeyboardInterrupt``) if :func:`guard_imports` had taken it."""
    if isinstance(signal.getsignal(signal.SIGINT), _Guard):
        signal.signal(signal.SIGINT, signal.default_int_handler)


guard_imports()         # on import: pykvm/__init__.py imports this module first
