"""The child process that runs a lab's checker steps beside the student's code.

Why this exists: the student's code may raise, hang or crash the interpreter
(a segfault, ``os._exit``); it runs here, never in the process that prints the
checklist. :mod:`pykvm.labs.runner` starts this module, reads one JSON line per
event from ``--report-fd`` and enforces each step's deadline; the student's
stdout goes to stderr, which the runner keeps apart from the reports.

Not a command for people: ``python -m pykvm.labs check N`` runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..hosts import detect
from . import get_lab
from .framework import TRACE, Context, Fail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pykvm.labs.child")
    parser.add_argument("--lab", type=int, required=True)
    parser.add_argument("--file", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--report-fd", type=int, required=True)
    parser.add_argument("--broken", default="{}", help="JSON {scenario key: reason}")
    args = parser.parse_args(argv)
    report = os.fdopen(args.report_fd, "w", buffering=1)

    def send(message: dict) -> None:
        report.write(json.dumps(message) + "\n")
        report.flush()

    os.dup2(2, 1)                     # the student's prints must not mix with the reports
    sys.stdout = sys.stderr
    student = Path(args.file).resolve()
    sys.path.insert(0, str(student.parent))
    TRACE.install()                   # before the student's module imports pykvm's classes
    lab = get_lab(args.lab)
    ctx = Context(student, args.seed, detect(), json.loads(args.broken), send)
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
    send({"event": "done"})
    report.close()
    sys.stderr.flush()
    os._exit(0)                       # the student's threads or atexit hooks cannot hold us


if __name__ == "__main__":
    sys.exit(main())
