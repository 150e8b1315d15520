"""How pykvm's commands end: the exit status and one line on stderr for every way a run can stop.

Why this exists: ``python -m pykvm.demo``, ``doctor`` and ``bench`` must end
cleanly whatever stops them: a missing ``/dev/kvm`` (status 2), a pykvm error
(1, its message), Python running out of memory (1), Ctrl-C at any point (130, "interrupted": the ``with`` blocks
have closed every VM on the way out, kicking vCPU threads first), or a closed
pipe (``| head``). Never a traceback from deep inside, never a signal death.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import NoReturn

from .core.errors import KvmUnavailableError, PyKvmError
from .startup import EXIT_INTERRUPTED  # 128 + SIGINT: the import guard, which must stay light, exits with it too

EXIT_ERROR = 1
EXIT_NO_KVM = 2


def exit_with(status: int) -> NoReturn:
    """End the process with ``status``; a Ctrl-C from now on is ignored.

    For a command's ``if __name__ == "__main__"`` only: Python restores SIGINT's
    default action while it shuts down, and a Ctrl-C landing then would kill the
    process by signal after the command had already finished. (Never called from
    ``main()``: a caller's process, pytest's say, must keep its Ctrl-C, and its
    children would inherit an ignored SIGINT.)
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(status)


def run_command(prog: str, body: Callable[[], int]) -> int:
    """Run a command's ``body`` and map how it ended to an exit status and a message on stderr."""
    try:
        return body()
    except KeyboardInterrupt:
        _say(f"\n{prog}: interrupted")
        return EXIT_INTERRUPTED
    except KvmUnavailableError as exc:
        _say(f"{prog}: cannot use KVM: {exc}")
        return EXIT_NO_KVM
    except PyKvmError as exc:
        _say(f"{prog}: {type(exc).__name__}: {exc}")
        return EXIT_ERROR
    except MemoryError:
        # Python could not allocate (a guest or a buffer too big for this host): say so, not a traceback.
        _say(f"{prog}: out of memory: this host could not give Python what the run asked for; ask for "
             f"less (a guest's --memory, fewer entries at once) or free memory")
        return EXIT_ERROR
    except BrokenPipeError:
        # The reader went away (`| head`): stop writing, and keep Python from complaining at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_ERROR


def _say(message: str) -> None:
    try:
        print(message, file=sys.stderr, flush=True)
    except (BrokenPipeError, KeyboardInterrupt):
        pass
