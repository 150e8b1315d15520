"""``python -m pykvm.labs [list | start N [DIR] | check N [DIR] | grade N FILE...]``: the teaching labs.

``list`` (the default) shows each lab: number, title, what it teaches, the
estimated time, and whether this host can run it fully (from the host's facts
and KVM capabilities, never from an assumed vendor). ``start N [DIR]`` copies
lab N's sheet and starter into DIR (default ``./pykvm-lab-N``) and refuses to
overwrite them. ``check N [DIR]`` runs the student's ``DIR/lab.py`` and prints
the checklist (``--json``: the report as one JSON line); the exit status is 0
only when every step passes. ``grade N FILE...`` checks a class's files side
by side and prints one row per student (:mod:`pykvm.labs.grade`); its status
is 0 when every file was graded, whatever the students scored. Usage errors
exit with 2, Ctrl-C with 130.
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import textwrap
import threading
from pathlib import Path

from ..command import description, invoked_as
from ..core.errors import InvalidArgument, PyKvmError
from ..core.system import Kvm
from ..hosts import HostInfo, detect
from . import all_labs, get_lab, grade
from .framework import SHEET_FILE, STUDENT_FILE, Lab, Support
from .runner import DEFAULT_DEADLINE, check, format_report

INTERRUPTED = 128 + signal.SIGINT      # the exit status of a check stopped with Ctrl-C, as shells report it


def host_support(lab: Lab, host: HostInfo, kvm: Kvm | None, kvm_problem: str) -> Support:
    """Whether ``lab`` runs fully here: /dev/kvm usable, its capabilities present, its host facts."""
    if kvm is None:
        return Support(False, f"no: {kvm_problem}")
    missing = [cap.name for cap in lab.requires if not kvm.check_extension(cap)]
    if missing:
        return Support(False, f"no: KVM lacks {', '.join('KVM_CAP_' + name for name in missing)}")
    return lab.support(host)


def list_labs(out=sys.stdout) -> int:
    host = detect()
    kvm: Kvm | None = None
    problem = ""
    try:
        kvm = Kvm()
    except (OSError, PyKvmError) as exc:
        problem = str(exc).splitlines()[0]
    try:
        print(f"pykvm labs, on this host's KVM: {host.name}\n", file=out)
        print(f"{'lab':>3}  {'title':<36} {'time':>7}  runs fully here?", file=out)
        for lab in all_labs():
            support = host_support(lab, host, kvm, problem)
            verdict = "yes" if support.full else "partly" if not support.note.startswith("no:") else "no"
            print(f"{lab.number:>3}  {lab.title:<36} {lab.minutes:>3} min  {verdict}", file=out)
            for line in textwrap.wrap(f"teaches: {lab.teaches}", 90):
                print(f"     {line}", file=out)
            if support.note:
                for line in textwrap.wrap(f"on {host.name}: {support.note.removeprefix('no: ')}", 90):
                    print(f"     {line}", file=out)
        print("\nstart one: python -m pykvm.labs start N [DIR]   "
              "check it: python -m pykvm.labs check N [DIR]", file=out)
    finally:
        if kvm is not None:
            kvm.close()
    return 0


def check_command(number: int) -> str:
    """The command that checks lab ``number`` from the student's folder, with this very Python."""
    return f"{shlex.quote(sys.executable)} -m pykvm.labs check {number} {STUDENT_FILE}"


def start_lab(number: int, directory: Path | None, out=sys.stdout) -> int:
    lab = get_lab(number)
    directory = directory or Path(f"pykvm-lab-{number}")
    targets = {directory / SHEET_FILE: lab.sheet, directory / STUDENT_FILE: lab.starter}
    existing = [path for path in targets if path.exists()]
    if existing:
        print(f"refusing to overwrite {', '.join(str(p) for p in existing)}: that may be your work. "
              f"Pick another directory (python -m pykvm.labs start {number} OTHER_DIR) or move the "
              f"files away first.", file=sys.stderr)
        return 1
    directory.mkdir(parents=True, exist_ok=True)
    for path, text in targets.items():
        with open(path, "x") as file:     # "x": never replace a file that appeared meanwhile
            file.write(text)
    print(f"Lab {lab.number}: {lab.title}\n  {directory / SHEET_FILE}   read this first\n"
          f"  {directory / STUDENT_FILE}     fill in the TODOs\n"
          f"check your work in {directory}: {check_command(number)}", file=out)
    return 0


def check_lab(number: int, directory: Path | None, seed: int | None, deadline: float, as_json: bool = False,
              out=sys.stdout) -> int:
    lab = get_lab(number)
    path = directory or Path(f"pykvm-lab-{number}")
    student = path if path.is_file() else path / STUDENT_FILE
    if not student.is_file():
        print(f"{student} does not exist; start the lab first: python -m pykvm.labs start {number} "
              f"{path}", file=sys.stderr)
        return 2
    print(f"checking {student} against lab {lab.number} (Ctrl-C stops the check)", file=sys.stderr, flush=True)
    report = check(lab, student, seed=seed, deadline=deadline, host=detect().name)
    print(json.dumps(grade.report_record(report)) if as_json else format_report(report), file=out)
    return 0 if report.passed else 1


def grade_lab(args: argparse.Namespace, out=sys.stdout) -> int:
    """``grade``: the rows on stdout (a table, or JSON), and in the files asked for."""
    rows = grade.grade(args.number, args.files, args.seed_from_name, args.deadline, args.jobs)
    lab = get_lab(args.number)
    if args.csv:
        with open(args.csv, "w", newline="") as stream:
            grade.write_csv(rows, stream)
    if args.junit:
        grade.junit_tree(lab, rows).write(args.junit, encoding="unicode", xml_declaration=True)
    if args.json:
        print(json.dumps(grade.json_document(lab, rows), indent=1), file=out)
    else:
        print(grade.format_table(lab, rows), file=out)
    return 0 if all(row.graded for row in rows) else 1


def _output_file(text: str) -> Path:
    """An argparse type: a file grade may write (its folder must exist)."""
    path = Path(text)
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: the folder {str(path.parent)!r} does not exist")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; name a file to write")
    return path


def _interrupted(number: int, frame: object) -> None:
    """The first Ctrl-C ends the check (the runner's cleanup runs); more while it cleans up are ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=invoked_as("pykvm.labs"), description=description(__doc__))
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("list", help="list the labs and whether this host runs them fully")
    start = commands.add_parser("start", help="copy lab N's sheet and starter into DIR")
    start.add_argument("number", type=int)
    start.add_argument("directory", nargs="?", type=Path)
    checker = commands.add_parser("check", help="check DIR/lab.py (or a file) against lab N")
    checker.add_argument("number", type=int)
    checker.add_argument("directory", nargs="?", type=Path)
    checker.add_argument("--seed", type=int, help="repeat a run's random task")
    checker.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE,
                         help=f"seconds each step may take (default {DEFAULT_DEADLINE:g}, or "
                              f"PYKVM_LAB_DEADLINE)")
    checker.add_argument("--json", action="store_true", help="print the report as one line of JSON")
    grader = commands.add_parser(
        "grade", help="check many students' files against lab N, one row each",
        description="Check each FILE (a student's lab.py) against lab N, one check per CPU at a time, each "
                    "file copied alone into a private temporary folder. Prints one row per student: steps "
                    "passed, time, the seed of their task (labs check N lab.py --seed S repeats it), the first "
                    "failed step and why. Exit status: 0 when every file was graded, whatever the students "
                    "scored; 1 when one could not be; 2 for a usage error; 130 on Ctrl-C.")
    grader.add_argument("number", type=int, metavar="N", help="the lab's number (python -m pykvm.labs lists them)")
    grader.add_argument("files", nargs="+", type=Path, metavar="FILE", help="a student's lab.py (never a folder)")
    grader.add_argument("--seed-from-name", action="store_true",
                        help="each file's task from a stable hash of its path as given (a rerun repeats it)")
    grader.add_argument("--csv", type=_output_file, metavar="F", help="also write the rows to CSV file F")
    grader.add_argument("--junit", type=_output_file, metavar="F",
                        help="also write JUnit XML to F (a testsuite per file, a testcase per step)")
    grader.add_argument("--json", action="store_true", help="print the rows as JSON instead of the table")
    grader.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE,
                        help=f"seconds each step may take (default {DEFAULT_DEADLINE:g})")
    grader.add_argument("--jobs", type=int, default=None,
                        help=f"checks side by side (default: one per CPU, here {grade.default_jobs()})")
    args = parser.parse_args(argv)
    if args.command == "check" and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _interrupted)
    try:
        if args.command in (None, "list"):
            return list_labs()
        if args.command == "start":
            return start_lab(args.number, args.directory)
        if args.command == "grade":
            return grade_lab(args)
        return check_lab(args.number, args.directory, args.seed, args.deadline, args.json)
    except KeyError as exc:
        print(exc.args[0], file=sys.stderr)
        return 2
    except InvalidArgument as exc:
        print(f"python -m pykvm.labs {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("check interrupted (Ctrl-C): nothing was graded, nothing is left running"
              if args.command == "check" else "interrupted", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
