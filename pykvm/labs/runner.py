"""Run a lab's checker against a student's file, each step under a deadline, in child processes.

Why this exists: ``check`` must always finish and print its checklist, whatever
the student's code does. The steps run in a child (:mod:`pykvm.labs.child`,
its own session); this side reads its reports with ``select`` and a deadline
per step. A step that hangs is killed (the whole process group) and failed
with the reason; a child that dies (a segfault, ``os._exit``) fails the step it
was in. Either way a fresh child goes on at the next step, told which of the
student's runs is broken so the steps that judge it fail at once. Every pipe,
temporary file and process is released before :func:`check` returns.
"""

from __future__ import annotations

import dataclasses
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .framework import Lab

DEFAULT_DEADLINE = float(os.environ.get("PYKVM_LAB_DEADLINE", "30"))
OUTPUT_LINES = 40          # lines of the student's output shown under the checklist
STARTUP = 120.0            # seconds a child may take to import pykvm (slow on emulated hosts)


@dataclasses.dataclass(frozen=True)
class StepResult:
    index: int
    title: str
    passed: bool
    detail: str = ""
    hint: str = ""


@dataclasses.dataclass(frozen=True)
class Report:
    lab: Lab
    student_file: Path
    seed: int
    host: str
    results: tuple[StepResult, ...]
    output: str = ""            # what the student's code printed (the last lines)

    @property
    def passed(self) -> bool:
        return all(result.passed for result in self.results)


def _signal_name(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        meaning = {"SIGSEGV": " (segmentation fault: memory access the process may not make)",
                   "SIGKILL": " (killed)", "SIGABRT": " (aborted)", "SIGBUS": " (bus error)"}
        return f"was killed by {name}{meaning.get(name, '')}"
    return f"exited with status {returncode} before reporting"


def _tail(stream, lines: int = 6) -> str:
    stream.seek(0)
    text = stream.read().decode(errors="replace").strip().splitlines()
    return "\n".join(text[-lines:])


class _Child:
    """One child process running steps from ``start``; yields its report events."""

    def __init__(self, lab: Lab, student_file: Path, seed: int, start: int, broken: dict[str, str],
                 python: str) -> None:
        read_end, write_end = os.pipe()
        self.output = tempfile.TemporaryFile()
        try:
            self.process = subprocess.Popen(
                [python, "-m", "pykvm.labs.child", "--lab", str(lab.number), "--file", str(student_file),
                 "--seed", str(seed), "--start", str(start), "--report-fd", str(write_end),
                 "--broken", json.dumps(broken)],
                stdin=subprocess.DEVNULL, stdout=self.output, stderr=self.output, pass_fds=(write_end,),
                start_new_session=True, cwd=student_file.parent)
        except BaseException:
            os.close(read_end)
            self.output.close()
            raise
        finally:
            os.close(write_end)
        self.read_end = read_end
        self.buffer = b""

    def next_event(self, deadline: float) -> dict | None:
        """The next report; None on EOF (the child is gone); TimeoutError past ``deadline``."""
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            ready, _, _ = select.select([self.read_end], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(self.read_end, 65536)
            if not chunk:
                return None
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return json.loads(line)

    def close(self) -> tuple[str, str, str]:
        """Kill what is left of the child's process group and reap it.

        Returns how it ended, its last output as evidence of a crash (or ""), and its output.
        """
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        returncode = self.process.wait()
        os.close(self.read_end)
        ended = _signal_name(returncode) if returncode else "exited"
        tail, printed = _tail(self.output), _tail(self.output, OUTPUT_LINES)
        self.output.close()
        return ended, (f"; its last output:\n{tail}" if tail and returncode else ""), printed


# A step stopped at its deadline is seldom about the step's own topic: say how to find where it hung.
HANG_HINT = ("code that never finishes is usually a run() loop waiting for an exit that never comes: print "
             "each exit with the guest's RIP (print(exit, hex(vcpu.regs.rip))) and look at the last ones; "
             "the same exit over and over (e.g. an OUT to port 0 at a growing RIP) means the guest is "
             "running where you did not put code: check the address you loaded it at and where the "
             "registers you set make it start")


def check(lab: Lab, student_file: Path | str, seed: int | None = None, deadline: float = DEFAULT_DEADLINE,
          python: str = sys.executable, host: str = "") -> Report:
    """Run every step of ``lab`` against ``student_file``; never hangs, never raises for the student's code."""
    student_file = Path(student_file).resolve()
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")
    results: dict[int, StepResult] = {}
    broken: dict[str, str] = {}
    start = 0
    steps = lab.steps
    printed: list[str] = []
    while start < len(steps):
        child = _Child(lab, student_file, seed, start, broken, python)
        current: int | None = None
        running: list[str] = []          # the scenarios in progress (their keys), innermost last
        limit = time.monotonic() + STARTUP
        problem = ""
        try:
            while True:
                try:
                    event = child.next_event(limit)
                except TimeoutError:
                    problem = (f"did not finish within {deadline:g} s (a hang? an endless run() loop, "
                               f"or a guest that never exits); it was stopped" if current is not None
                               else f"the checker's process did not start within {STARTUP:g} s")
                    break
                if event is None:
                    problem = "the process running your code "
                    break
                kind = event["event"]
                if kind == "step":
                    current = event["index"]
                    limit = time.monotonic() + deadline
                elif kind == "begin":
                    running.append(event["key"])
                elif kind == "end" and running:
                    running.pop()
                elif kind == "result":
                    index = event["index"]
                    results[index] = StepResult(index, steps[index].title, event["passed"],
                                                event.get("detail", ""), event.get("hint", ""))
                    current = None
                elif kind == "done":
                    break
        finally:
            ended, output, text = child.close()
            if text:
                printed.append(text)
        if not problem:
            break
        if problem.endswith(" "):
            problem += ended
        if current is None:             # died before or between steps: nothing more can run
            current = start if not results else max(results) + 1
            if current >= len(steps):
                break
        inside = [key for key in running if key != "import"]
        reason = problem + (f" (in the run of {inside[-1]}())" if inside else
                            " (while importing your file)" if running else "") + output
        hint = HANG_HINT if problem.startswith("did not finish") else steps[current].hint
        results[current] = StepResult(current, steps[current].title, False, reason, hint)
        for key in running:             # every step that judges these runs is "not checked"
            broken[key] = reason
        start = current + 1
    ordered = tuple(results.get(i, StepResult(i, step.title, False, "not run")) for i, step in enumerate(steps))
    output = "\n".join("\n".join(printed).splitlines()[-OUTPUT_LINES:])
    return Report(lab, student_file, seed, host, ordered, output)


def format_report(report: Report) -> str:
    """The checklist a student reads."""
    lab = report.lab
    lines = [f"Lab {lab.number}: {lab.title}",
             f"checking {report.student_file} on {report.host or 'this host'} (seed {report.seed}; "
             f"--seed {report.seed} repeats this run)", ""]
    for result in report.results:
        mark = "PASS" if result.passed else "FAIL"
        lines.append(f"  [{mark}] {result.index + 1}. {result.title}")
        if result.passed and result.detail:
            lines.append(f"         {result.detail}")
        if not result.passed:
            for number, text in enumerate(result.detail.splitlines() or ["(no reason given)"]):
                lines.append(f"         {'why:  ' if number == 0 else '      '}{text}")
            if result.hint:
                lines.append(f"         hint: {result.hint}")
    if report.output:
        lines += ["", f"your code printed (the last {OUTPUT_LINES} lines at most):"]
        lines += [f"  | {line}" for line in report.output.splitlines()]
    passed = sum(result.passed for result in report.results)
    lines += ["", f"{passed} of {len(report.results)} steps passed" +
              (": lab complete." if report.passed else ".")]
    return "\n".join(lines)


def check_here(number: int, student_file: str) -> None:
    """What a starter's ``if __name__ == "__main__"`` calls: check this file, print, exit with the verdict."""
    from ..hosts import detect
    from . import get_lab
    report = check(get_lab(number), student_file, host=detect().name)
    print(format_report(report))
    sys.exit(0 if report.passed else 1)
