"""The child process that runs a lab's checker steps beside the student's code.

Why this exists: the student's code may raise, hang or crash the interpreter
(a segfault, ``os._exit``); it runs here, never in the process that prints the
checklist. :mod:`pykvm.labs.runner` starts this module with ``python -I`` in an
empty working directory (nothing of the student's folder on ``sys.path``; the
student's file is loaded by its path), where the host allows in its own PID,
mount and user namespaces (:func:`pykvm.labs.runner.isolation`). Then this
process is PID 1 there: it forks the worker that runs the steps and reports
how the worker ended on ``--status-fd``.

The worker limits its own memory, CPU time, file size and tasks, sends one JSON
datagram per event on the ``--report-fd`` socket, and sends every vCPU's KVM
statistics fd along (:mod:`pykvm.labs.verdict`). The student's stdout goes to
stderr, which the runner reads separately. What the worker reports is a
diagnosis; the verdict is the runner's.

Not a command for people: ``python -m pykvm.labs check N`` runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import signal
import socket
import sys
from pathlib import Path

MEMORY_LIMIT = 4 << 30           # bytes of address space: a lab's guests need a few MiB, Python some 100
FILE_LIMIT = 64 << 20            # bytes any file the student's code writes may grow to
TASK_LIMIT = 256                 # processes and threads the student's code may add: a fork bomb stops there
GO = b"go"                       # the runner's answer to "ready": student code may start


def _tasks_of_this_user() -> int:
    """The processes' threads this user runs, as this process sees them: what RLIMIT_NPROC counts."""
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):           # it ended meanwhile
                if os.stat(f"/proc/{entry}").st_uid == os.getuid():
                    count += len(os.listdir(f"/proc/{entry}/task"))
    return count


def _limit_resources(cpu_seconds: int, pids_cgroup: str) -> None:
    """Memory, CPU, file-size and task limits, set before any of the student's code runs.

    RLIMIT_NPROC counts all of the user's tasks (in a user namespace of its own, only the check's), so
    the cap is :data:`TASK_LIMIT` above what runs now; the kernel never applies it to root, whose cap
    is the pids cgroup the runner made (``pids_cgroup``, "" where it could make none), joined here.
    """
    if pids_cgroup:
        with open(Path(pids_cgroup) / "cgroup.procs", "w") as procs:
            procs.write("0")                             # this process, and all it will start
    for limit, value in ((resource.RLIMIT_AS, MEMORY_LIMIT), (resource.RLIMIT_CPU, cpu_seconds),
                         (resource.RLIMIT_FSIZE, FILE_LIMIT), (resource.RLIMIT_CORE, 0),
                         (resource.RLIMIT_NPROC, _tasks_of_this_user() + TASK_LIMIT)):
        _, hard = resource.getrlimit(limit)
        resource.setrlimit(limit, (value if hard == resource.RLIM_INFINITY else min(value, hard), hard))


def _be_init(status_fd: int, report_fd: int) -> None:
    """As PID 1 of the check's namespace: fork the worker, reap everything, report the worker's end.

    Returns only in the worker. When this process exits, the kernel kills every
    process left in the namespace: nothing the student started outlives the child.
    """
    os.setsid()                  # the worker's kill(0, ...) reaches this namespace only
    worker = os.fork()
    if worker == 0:
        os.close(status_fd)
        return
    os.close(report_fd)          # the runner sees the channel close when the worker's copy closes
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, signal.SIG_IGN)
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(1)
        if pid == worker:
            os.write(status_fd, b"%d\n" % status)
            os._exit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pykvm.labs.child")
    parser.add_argument("--lab", type=int, required=True)
    parser.add_argument("--file", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--report-fd", type=int, required=True)
    parser.add_argument("--status-fd", type=int, default=-1)
    parser.add_argument("--cpu-seconds", type=int, required=True)
    parser.add_argument("--pids-cgroup", default="", help="the pids cgroup to join (its pids.max caps forks)")
    parser.add_argument("--broken", default="{}", help="JSON {scenario key: reason}")
    args = parser.parse_args(argv)
    if os.getpid() == 1:
        _be_init(args.status_fd, args.report_fd)
    report = socket.socket(fileno=args.report_fd)

    def send(message: dict, fds: tuple[int, ...] = ()) -> None:
        socket.send_fds(report, [json.dumps(message).encode()], list(fds))

    os.dup2(2, 1)                     # the student's prints must not mix with the reports
    sys.stdout = sys.stderr
    from ..hosts import detect
    from . import get_lab
    from .framework import TRACE, Context, Fail
    host = detect()                   # may measure the host (no cache): the checker's vCPUs, so before the trace
    TRACE.install(send)               # before the student's module imports pykvm's classes
    lab = get_lab(args.lab)
    ctx = Context(Path(args.file), args.seed, host, json.loads(args.broken), send)
    _limit_resources(args.cpu_seconds, args.pids_cgroup)
    send({"event": "ready"})
    if report.recv(len(GO)) != GO:    # the runner has noted the processes that are the checker's own
        os._exit(1)
    for index in range(args.start, len(lab.steps)):
        step = lab.steps[index]
        ctx.step = index
        send({"event": "step", "index": index})
        try:
            detail = step.check(ctx) or ""
            send({"event": "result", "index": index, "passed": True, "detail": detail})
        except Fail as failure:
            send({"event": "result", "index": index, "passed": False, "detail": failure.reason,
                  "hint": failure.hint or step.hint})
        except Exception as exc:     # a bug in the checker, reported as such
            send({"event": "result", "index": index, "passed": False,
                  "detail": f"the checker itself failed: {type(exc).__name__}: {exc}",
                  "hint": "this is not your fault; tell your teacher"})
        if report.recv(len(GO)) != GO:   # the runner has ended what the step started
            os._exit(1)
    send({"event": "done"})
    sys.stderr.flush()
    os._exit(0)                       # the student's threads or atexit hooks cannot hold us


if __name__ == "__main__":
    sys.exit(main())
