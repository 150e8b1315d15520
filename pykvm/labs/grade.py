"""``python -m pykvm.labs grade N FILE...``: grade a class's submissions of one lab, side by side.

Why this exists: a teacher has one ``lab.py`` per student and wants one line per
student (steps passed, time, the first failed step and why) as a table, CSV,
JSON or JUnit XML for CI, without trusting any submission. Each file is copied
alone into a fresh private temporary directory (never run in the student's
folder, never beside another student's files) and checked there by its own
``python -m pykvm.labs check N lab.py --json`` process, which runs the
student's code in child processes under per-step deadlines
(:mod:`pykvm.labs.runner`). Up to one check per CPU runs at a time; this
process only waits for them, so its own memory stays small whatever the class
size. Ctrl-C stops every check (each kills its own children) and nothing is
left running.

With ``--seed-from-name`` each student's random task comes from a stable hash
of the file's path as given on the command line (normalised: ``./a/lab.py``
is ``a/lab.py``): every student gets a different task and a rerun from the
same folder gets the same. Without it every check draws a fresh seed. Either
way the row shows the seed, and ``python -m pykvm.labs check N lab.py --seed
S`` repeats a student's run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any
from xml.etree import ElementTree

from ..core.errors import InvalidArgument
from . import all_labs, get_lab
from .framework import STUDENT_FILE, Lab
from .runner import DEFAULT_DEADLINE, STARTUP, Report, end_tree, sigint_held

STOP_GRACE = 10.0          # seconds a check may take to clean up after Ctrl-C before it is killed
SEED_BYTES = 4             # the size of the seeds `labs check` draws itself


def seed_from_name(name: str) -> int:
    """A seed for the file ``name``: the first bytes of its SHA-256, the same in every process.

    (Python's ``hash()`` of a string changes from one interpreter to the next.)
    """
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:SEED_BYTES], "big")


def report_record(report: Report) -> dict[str, Any]:
    """A check's report as plain data: what ``labs check --json`` prints and the grader reads back."""
    return {"lab": report.lab.number, "seed": report.seed, "host": report.host, "passed": report.passed,
            "steps": [{"step": result.index + 1, "title": result.title, "passed": result.passed,
                       "detail": result.detail} for result in report.results],
            "output": report.output}


# -- what grading produces -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StepOutcome:
    """One step of one student's check: its number (from 1), title, verdict and the checker's reason."""

    step: int
    title: str
    passed: bool
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class Row:
    """One student: their file as given, the seed of their task, each step's outcome, the wall time.

    ``problem`` is why the file could not be graded at all ("" when it was).
    """

    file: str
    seed: int | None
    steps: tuple[StepOutcome, ...]
    seconds: float
    host: str = ""
    problem: str = ""

    @property
    def graded(self) -> bool:
        return not self.problem

    @property
    def passed(self) -> int:
        return sum(outcome.passed for outcome in self.steps)

    @property
    def total(self) -> int:
        return len(self.steps)

    @property
    def first_failure(self) -> StepOutcome | None:
        return next((outcome for outcome in self.steps if not outcome.passed), None)

    @property
    def reason(self) -> str:
        """Why the student lost the first step they lost (or why the file was not graded)."""
        failure = self.first_failure
        return self.problem or (failure.detail if failure else "")


@dataclasses.dataclass(frozen=True)
class Submission:
    path: Path                 # the file as given
    name: str                  # its path as given, normalised: the row's label and the seed's source
    seed: int | None


def _lab(number: int) -> Lab:
    try:
        return get_lab(number)
    except KeyError:
        labs = [lab.number for lab in all_labs()]
        raise InvalidArgument(f"N={number}: there is no lab {number}; the labs are {labs[0]}..{labs[-1]} "
                              f"(python -m pykvm.labs lists them)") from None


def submissions(files: Iterable[Path | str], from_name: bool) -> list[Submission]:
    """The files to grade, checked: each an existing regular file, none given twice."""
    chosen: list[Submission] = []
    seen: dict[Path, str] = {}
    for file in files:
        path = Path(file)
        if path.is_dir():
            raise InvalidArgument(f"FILE {str(file)!r} is a folder: grade takes each student's file, never "
                                  f"a folder (e.g. {path / STUDENT_FILE})")
        if not path.is_file():
            raise InvalidArgument(f"FILE {str(file)!r} does not exist (or is not a regular file): check the "
                                  f"path, or leave it out")
        if path.resolve() in seen:
            raise InvalidArgument(f"FILE {str(file)!r} is the same file as {seen[path.resolve()]!r}: give each "
                                  f"student's file once")
        seen[path.resolve()] = str(file)
        name = os.path.normpath(file)
        chosen.append(Submission(path, name, seed_from_name(name) if from_name else None))
    if not chosen:
        raise InvalidArgument("FILE: no files given; name each student's lab.py (e.g. submissions/*/lab.py)")
    return chosen


# -- running the checks ------------------------------------------------------------------------

class _Check:
    """One ``labs check --json`` process grading one submission's private copy."""

    def __init__(self, lab: Lab, submission: Submission, scratch: Path, deadline: float, python: str) -> None:
        self.submission = submission
        self.directory = Path(tempfile.mkdtemp(prefix="student-", dir=scratch))    # mode 0700
        copy = self.directory / STUDENT_FILE
        shutil.copyfile(submission.path, copy)
        command = [python, "-m", "pykvm.labs", "check", str(lab.number), str(copy), "--json",
                   "--deadline", f"{deadline:g}"]
        if submission.seed is not None:
            command += ["--seed", str(submission.seed)]
        self.stdout, self.stderr = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        self.started = time.monotonic()
        # Budget: the runner bounds each step by the deadline and each child's start-up by STARTUP.
        self.limit = self.started + len(lab.steps) * (deadline + STARTUP) + STARTUP
        try:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=self.stdout,
                                            stderr=self.stderr, cwd=self.directory, start_new_session=True)
        except BaseException:
            self.stdout.close()
            self.stderr.close()
            raise
        try:
            self.pidfd = os.pidfd_open(self.process.pid)     # readable once the process has ended
        except BaseException:
            self.process.kill()
            self.process.wait()
            self.stdout.close()
            self.stderr.close()
            raise

    def row(self, problem: str = "") -> Row:
        """The student's row, from the check's JSON (or ``problem`` when it was stopped)."""
        seconds = time.monotonic() - self.started
        name, seed = self.submission.name, self.submission.seed
        if problem:
            return Row(name, seed, (), seconds, problem=problem)
        record = _last_json(self.stdout)
        if record is None:
            return Row(name, seed, (), seconds, problem=f"the check exited with status {self.process.returncode} "
                                                        f"and no report: {_tail(self.stderr)}")
        steps = tuple(StepOutcome(s["step"], s["title"], s["passed"], s["detail"]) for s in record["steps"])
        return Row(name, record["seed"], steps, seconds, record["host"])

    def stop(self) -> None:
        """Ask the check to stop (on Ctrl-C it kills its children and exits), then kill what is left."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            end_tree(self.process.pid)
            self.process.wait()

    def close(self) -> None:
        if self.process.poll() is None:
            self.stop()
        os.close(self.pidfd)
        self.stdout.close()
        self.stderr.close()
        shutil.rmtree(self.directory, ignore_errors=True)


def _last_json(stream: IO[bytes]) -> dict | None:
    stream.seek(0)
    lines = stream.read().decode(errors="replace").strip().splitlines()
    try:
        return json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        return None


def _tail(stream: IO[bytes], lines: int = 4) -> str:
    stream.seek(0)
    return " | ".join(stream.read().decode(errors="replace").strip().splitlines()[-lines:]) or "(no output)"


def default_jobs() -> int:
    """How many checks run side by side: one per CPU this process may use."""
    return len(os.sched_getaffinity(0))


def grade(number: int, files: Iterable[Path | str], seed_from_names: bool = False,
          deadline: float = DEFAULT_DEADLINE, jobs: int | None = None, python: str = sys.executable) -> list[Row]:
    """Check every file against lab ``number``, ``jobs`` at a time; one :class:`Row` per file, in order.

    Never raises for a student's code; raises :class:`InvalidArgument` naming the argument for a lab
    that does not exist, a missing file, a folder, a file given twice, a bad deadline or job count.
    On Ctrl-C every check is stopped and reaped before ``KeyboardInterrupt`` propagates.
    """
    lab = _lab(number)
    chosen = submissions(files, seed_from_names)
    if not deadline > 0:
        raise InvalidArgument(f"--deadline={deadline!r}: the seconds each step may take must be above 0")
    jobs = default_jobs() if jobs is None else jobs
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise InvalidArgument(f"--jobs={jobs!r}: the number of checks side by side must be 1 or more")
    rows: dict[int, Row] = {}
    waiting = deque(enumerate(chosen))
    running: dict[int, tuple[int, _Check]] = {}        # pidfd -> (index, check)
    with tempfile.TemporaryDirectory(prefix="pykvm-grade-") as scratch:
        try:
            while waiting or running:
                while waiting and len(running) < jobs:
                    # (not under sigint_held: the check would inherit the blocked SIGINT)
                    index, submission = waiting.popleft()
                    check = _Check(lab, submission, Path(scratch), deadline, python)
                    running[check.pidfd] = (index, check)
                _collect(running, rows)
        finally:
            with sigint_held():                   # a second Ctrl-C waits until every check is gone
                for _, check in running.values():
                    check.close()
    return [rows[index] for index in range(len(chosen))]


def _collect(running: dict[int, tuple[int, _Check]], rows: dict[int, Row]) -> None:
    """Wait for a check to end (or pass its budget) and move its row from ``running`` to ``rows``."""
    soonest = min(check.limit for _, check in running.values())
    ready, _, _ = select.select(list(running), [], [], max(0.0, soonest - time.monotonic()))
    now = time.monotonic()
    for pidfd in list(running):
        index, check = running[pidfd]
        if pidfd in ready:
            check.process.wait()
            rows[index] = check.row()
        elif now >= check.limit:
            check.stop()
            rows[index] = check.row(f"the check did not finish within {check.limit - check.started:.0f} s "
                                    f"and was stopped")
        else:
            continue
        del running[pidfd]
        check.close()


# -- what the teacher reads -------------------------------------------------------------------------

def format_table(lab: Lab, rows: Sequence[Row]) -> str:
    """One line per student: file, steps passed, time, seed, and the first failed step with its reason."""
    width = max(len("file"), *(len(row.file) for row in rows))
    hosts = sorted({row.host for row in rows if row.host})
    lines = [f"Lab {lab.number}: {lab.title}" + (f", on {', '.join(hosts)}" if hosts else ""), "",
             f"{'file':<{width}}  passed    time        seed  first failed step"]
    for row in rows:
        failure = row.first_failure
        if not row.graded:
            what = f"not graded: {row.problem}"
        elif failure is None:
            what = "-"
        else:
            what = f"{failure.step}. {failure.title}: {(failure.detail.splitlines() or [''])[0]}"
        seed = "" if row.seed is None else str(row.seed)
        lines.append(f"{row.file:<{width}}  {f'{row.passed}/{row.total}':>6}  {row.seconds:6.1f} s  "
                     f"{seed:>10}  {what}")
    complete = sum(row.graded and row.passed == row.total for row in rows)
    ungraded = sum(not row.graded for row in rows)
    lines += ["", f"{complete} of {len(rows)} files passed every step"
              + (f"; {ungraded} could not be graded" if ungraded else "") + "."]
    return "\n".join(lines)


CSV_COLUMNS = ("file", "seed", "passed", "total", "seconds", "failed_step", "failed_title", "reason")


def write_csv(rows: Sequence[Row], stream: IO[str]) -> None:
    import csv
    writer = csv.writer(stream)
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        failure = row.first_failure
        writer.writerow([row.file, "" if row.seed is None else row.seed, row.passed, row.total,
                         f"{row.seconds:.2f}", failure.step if failure else "", failure.title if failure else "",
                         row.reason])


def json_document(lab: Lab, rows: Sequence[Row]) -> dict[str, Any]:
    return {"lab": lab.number, "title": lab.title,
            "files": [{"file": row.file, "seed": row.seed, "host": row.host, "graded": row.graded,
                       "problem": row.problem, "passed": row.passed, "total": row.total,
                       "seconds": round(row.seconds, 3), "steps": [dataclasses.asdict(s) for s in row.steps]}
                      for row in rows]}


def junit_tree(lab: Lab, rows: Sequence[Row]) -> ElementTree.ElementTree:
    """JUnit XML: a testsuite per student (their file), a testcase per step; an ungraded file is an error."""
    suites = ElementTree.Element("testsuites", name=f"pykvm lab {lab.number}: {lab.title}")
    for row in rows:
        failures = sum(not outcome.passed for outcome in row.steps)
        suite = ElementTree.SubElement(suites, "testsuite", name=row.file, tests=str(max(row.total, 1)),
                                       failures=str(failures), errors=str(int(not row.graded)),
                                       time=f"{row.seconds:.3f}")
        properties = ElementTree.SubElement(suite, "properties")
        ElementTree.SubElement(properties, "property", name="seed", value="" if row.seed is None else str(row.seed))
        if not row.graded:
            case = ElementTree.SubElement(suite, "testcase", classname=row.file, name="grading")
            ElementTree.SubElement(case, "error", message=row.problem.splitlines()[0]).text = row.problem
        for outcome in row.steps:
            case = ElementTree.SubElement(suite, "testcase", classname=row.file,
                                          name=f"{outcome.step}. {outcome.title}")
            if not outcome.passed:
                first = (outcome.detail.splitlines() or ["failed"])[0]
                ElementTree.SubElement(case, "failure", message=first).text = outcome.detail
    tree = ElementTree.ElementTree(suites)
    ElementTree.indent(tree)
    return tree
