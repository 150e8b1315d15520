"""``python -m pykvm.labs grade``: one row per student, side by side, in a table, CSV, JSON and JUnit XML.

The rows come from real checks of the reference and wrong solutions in
tests/labs_reference on this machine's /dev/kvm (the ``kvm`` fixture skips
them elsewhere); the seed derivation, the argument errors and the output
formats of hand-made rows need no KVM.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from xml.etree import ElementTree

import psutil
import pytest
from test_labs import REFERENCE, WRONG, _wrong_solution

from pykvm.core.errors import InvalidArgument
from pykvm.labs import get_lab
from pykvm.labs.__main__ import main as labs_main
from pykvm.labs.framework import STUDENT_FILE
from pykvm.labs.grade import (
    STOP_GRACE,
    Row,
    StepOutcome,
    format_table,
    grade,
    json_document,
    junit_tree,
    seed_from_name,
    write_csv,
)
from pykvm.labs.runner import check
from pykvm.testing import popen_interruptible

pytestmark = pytest.mark.deadline(600)

GRADE = [sys.executable, "-m", "pykvm.labs", "grade"]
GRADER_MEMORY = 200 << 20          # bytes of RSS the grader itself may use
HANG = "def solve(task):\n    while True:\n        pass\n"


def _file(directory: Path, name: str, text: str) -> Path:
    path = directory / name / STUDENT_FILE
    path.parent.mkdir(parents=True)
    path.write_text(text)
    return path


def _run_measured(command: list[str], cwd: Path, timeout: float = 300) -> tuple[subprocess.CompletedProcess, int]:
    """Run the grader; its result and the largest RSS psutil saw of the grader process itself."""
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watched, peak, limit = psutil.Process(process.pid), 0, time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < limit:
        try:
            peak = max(peak, watched.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.02)
    out, err = process.communicate(timeout=max(1.0, limit - time.monotonic()))
    return subprocess.CompletedProcess(command, process.returncode, out, err), peak


# -- the seed, the arguments, the formats: no KVM -----------------------------------------------

@pytest.mark.host_independent
def test_seed_from_a_name_is_stable_across_processes_and_differs_between_names():
    names = ["subs/alice/lab.py", "subs/bob/lab.py", "alice.py", "bob.py"]
    seeds = [seed_from_name(name) for name in names]
    assert len(set(seeds)) == len(names) and all(0 <= seed < 1 << 32 for seed in seeds)
    script = f"from pykvm.labs.grade import seed_from_name; print([seed_from_name(n) for n in {names!r}])"
    for hash_seed in ("1", "2"):            # hash() of a string would differ between these two
        other = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                               env={**os.environ, "PYTHONHASHSEED": hash_seed})
        assert json.loads(other.stdout) == seeds, other.stderr


@pytest.mark.host_independent
def test_misuse_is_a_typed_error_naming_the_argument(tmp_path):
    student = _file(tmp_path, "alice", HANG)
    cases = [((99, [student]), "N=99: there is no lab 99"),
             ((1, [tmp_path / "nobody.py"]), "FILE") ,
             ((1, [student.parent]), "is a folder"),
             ((1, [student, tmp_path / "alice" / ".." / "alice" / STUDENT_FILE]), "is the same file as"),
             ((1, []), "no files given")]
    for (number, files), phrase in cases:
        with pytest.raises(InvalidArgument, match=phrase):
            grade(number, files)
    with pytest.raises(InvalidArgument, match="--deadline=0"):
        grade(1, [student], deadline=0)
    with pytest.raises(InvalidArgument, match="--jobs=0"):
        grade(1, [student], jobs=0)


@pytest.mark.host_independent
def test_usage_errors_exit_with_2_and_say_which_argument(tmp_path, capsys):
    student = _file(tmp_path, "alice", HANG)
    assert labs_main(["grade", "99", str(student)]) == 2
    assert "N=99" in capsys.readouterr().err
    assert labs_main(["grade", "1", str(tmp_path / "missing.py")]) == 2
    assert "missing.py' does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        labs_main(["grade", "1", str(student), "--csv", str(tmp_path / "no" / "such" / "folder.csv")])
    assert exited.value.code == 2 and "--csv" in capsys.readouterr().err


@pytest.mark.host_independent
def test_a_check_that_gives_no_report_is_a_row_that_says_so(tmp_path):
    student = _file(tmp_path, "alice", HANG)
    [row] = grade(1, [student], python="/bin/false")              # a "Python" that exits 1 at once
    assert not row.graded and row.total == 0
    assert row.problem == "the check exited with status 1 and no report: (no output)"
    assert "not graded: the check exited with status 1" in format_table(get_lab(1), [row])


ROWS = [Row("subs/alice/lab.py", 7, (StepOutcome(1, "first", True, "ok"), StepOutcome(2, "second", True)), 1.5,
            "kvm_pvm"),
        Row("subs/bob/lab.py", 8, (StepOutcome(1, "first", True), StepOutcome(2, "second", False,
                                                                            'took "0x41", not 0x42\nmore')), 2.25,
            "kvm_pvm"),
        Row("subs/carol/lab.py", None, (), 9.0, problem="the check exited with status 1 and no report")]


@pytest.mark.host_independent
def test_table_csv_json_and_junit_of_the_same_rows_parse_back():
    lab = get_lab(1)
    table = format_table(lab, ROWS).splitlines()
    assert table[0] == "Lab 1: First VM, on kvm_pvm"
    assert table[3].split()[:2] == ["subs/alice/lab.py", "2/2"] and table[3].endswith(" -")
    assert table[4].split()[:2] == ["subs/bob/lab.py", "1/2"] and table[4].endswith('2. second: took "0x41", not 0x42')
    assert "not graded: the check exited" in table[5]
    assert table[-1] == "1 of 3 files passed every step; 1 could not be graded."

    stream = io.StringIO()
    write_csv(ROWS, stream)
    rows = list(csv.DictReader(io.StringIO(stream.getvalue())))
    assert [(r["file"], r["seed"], r["passed"], r["total"], r["failed_step"]) for r in rows] == [
        ("subs/alice/lab.py", "7", "2", "2", ""), ("subs/bob/lab.py", "8", "1", "2", "2"),
        ("subs/carol/lab.py", "", "0", "0", "")]
    assert rows[1]["reason"] == 'took "0x41", not 0x42\nmore' and rows[2]["reason"].startswith("the check exited")

    document = json.loads(json.dumps(json_document(lab, ROWS)))
    assert [(f["file"], f["passed"], f["total"], f["graded"]) for f in document["files"]] == [
        ("subs/alice/lab.py", 2, 2, True), ("subs/bob/lab.py", 1, 2, True), ("subs/carol/lab.py", 0, 0, False)]
    assert document["files"][1]["steps"][1] == {"step": 2, "title": "second", "passed": False,
                                                 "detail": 'took "0x41", not 0x42\nmore'}

    text = io.StringIO()
    junit_tree(lab, ROWS).write(text, encoding="unicode", xml_declaration=True)
    suites = ElementTree.fromstring(text.getvalue())
    assert [(s.get("name"), s.get("tests"), s.get("failures"), s.get("errors")) for s in suites] == [
        ("subs/alice/lab.py", "2", "0", "0"), ("subs/bob/lab.py", "2", "1", "0"), ("subs/carol/lab.py", "1", "0", "1")]
    [failure] = suites[1].iter("failure")
    assert failure.get("message") == 'took "0x41", not 0x42' and failure.text == 'took "0x41", not 0x42\nmore'
    assert suites[2].find("testcase/error") is not None
    assert suites[0].find("properties/property").get("value") == "7"


# -- grading real files on /dev/kvm --------------------------------------------------------------

@pytest.mark.host_independent
def test_rows_of_references_and_wrong_solutions(kvm, tmp_path):
    for number in (1, 2):
        names = sorted(name for name in WRONG if name.startswith(f"lab{number:02d}_"))
        files = [REFERENCE / f"lab{number:02d}.py"] + [_wrong_solution(name, tmp_path) for name in names]
        rows = grade(number, files, seed_from_names=True, deadline=60)
        total = len(get_lab(number).steps)
        assert [row.file for row in rows] == [os.path.normpath(file) for file in files]
        reference, *wrong = rows
        assert (reference.passed, reference.total, reference.first_failure) == (total, total, None)
        for name, row in zip(names, wrong, strict=True):
            assert row.graded and row.total == total and row.passed < total, row
            assert row.passed == sum(outcome.passed for outcome in row.steps)
            matched = [step for step, phrase in WRONG[name]           # the mistake the checker must name
                       if not row.steps[step - 1].passed and phrase in row.steps[step - 1].detail]
            assert matched, row
            failure = row.first_failure
            assert failure is not None and failure.step <= min(matched)
            line = next(line for line in format_table(get_lab(number), rows).splitlines()
                        if line.startswith(row.file))
            assert f"{row.passed}/{total}" in line and f"{failure.step}. {failure.title}" in line


@pytest.mark.host_independent
def test_each_file_is_graded_alone_in_a_private_copy(kvm, tmp_path):
    """A file that needs its folder (a helper module beside it) fails, graded or checked, and its folder is untouched.

    ``check`` runs the file isolated (``python -I``, an empty working folder), so even in place
    nothing beside it is importable; ``grade`` also copies it alone, so the folder is never read.
    The helper would pass the lab (it is the reference) and writes a file where it runs.
    """
    student = _file(tmp_path, "dave", "from helper import solve  # noqa: F401\n")
    (student.parent / "helper.py").write_text((REFERENCE / "lab01.py").read_text() +
                                              "\nopen('written-by-the-student', 'w').close()\n")
    in_place = check(get_lab(1), student, deadline=60)
    assert not in_place.passed and "No module named 'helper'" in in_place.results[0].detail
    [row] = grade(1, [student], deadline=60)
    assert row.passed == 0 and "No module named 'helper'" in row.steps[0].detail
    assert sorted(p.name for p in student.parent.iterdir()) == ["helper.py", STUDENT_FILE]


@pytest.mark.host_independent
def test_a_hostile_file_is_a_failed_row_not_a_hang(kvm, tmp_path):
    hang_at_import = _file(tmp_path, "eve", "while True:\n    pass\n")
    hang_in_solve = _file(tmp_path, "mallory", HANG)
    started = time.monotonic()
    rows = grade(1, [hang_at_import, hang_in_solve, REFERENCE / "lab01.py"], deadline=2, jobs=2)
    assert time.monotonic() - started < 2 * (2 + 60)           # a deadline (and start-up) per hanging file
    for row in rows[:2]:
        assert row.graded and row.passed == 0 and "did not finish within 2 s" in row.steps[0].detail
    assert rows[2].passed == rows[2].total


@pytest.mark.host_independent
def test_command_writes_csv_and_junit_and_a_rerun_gets_the_same_tasks(kvm, tmp_path):
    (tmp_path / "subs").mkdir()
    files = [_file(tmp_path / "subs", "alice", (REFERENCE / "lab01.py").read_text()),
             _wrong_solution("lab01_wrong_no_reply", tmp_path / "subs")]
    names = [str(file.relative_to(tmp_path)) for file in files]
    first, peak = _run_measured(GRADE + ["1", *names, "--seed-from-name", "--csv", "rows.csv", "--junit",
                                         "rows.xml", "--deadline", "60"], tmp_path)
    assert first.returncode == 0, first.stderr                 # every file graded, though one failed
    assert peak < GRADER_MEMORY, f"the grader's RSS reached {peak >> 20} MiB"
    lines = first.stdout.splitlines()
    assert lines[3].split()[:2] == [names[0], "4/4"] and lines[3].split()[3] == "s"
    assert lines[4].split()[:2] == [names[1], "2/4"] and "3. the guest reads task.answer" in lines[4]

    with open(tmp_path / "rows.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [(r["file"], int(r["seed"]), r["passed"], r["failed_step"]) for r in rows] == [
        (names[0], seed_from_name(names[0]), "4", ""), (names[1], seed_from_name(names[1]), "2", "3")]
    suites = ElementTree.parse(tmp_path / "rows.xml").getroot()
    assert [(s.get("name"), s.get("tests"), s.get("failures")) for s in suites] == [
        (names[0], "4", "0"), (names[1], "4", "2")]

    again, _ = _run_measured(GRADE + ["1", *names, "--seed-from-name", "--json", "--deadline", "60"], tmp_path)
    document = json.loads(again.stdout)
    assert [f["seed"] for f in document["files"]] == [int(r["seed"]) for r in rows]
    # the same seed, the same task: step 4 of the wrong solution names the task's random answer, in both runs
    [*_, last] = suites[1].iter("failure")
    assert "had the guest read task.answer, EBX would be 0x" in last.text
    assert document["files"][1]["steps"][3]["detail"] == last.text


def _hang_announced(mark: Path) -> str:
    """A solve() that spins forever once it has created ``mark``: a check is in the student's code when it exists."""
    return (f"from pathlib import Path\n\ndef solve(task):\n    Path({str(mark)!r}).touch()\n"
            "    while True:\n        pass\n")


@pytest.mark.host_independent
def test_ctrl_c_stops_every_check_and_exits_130(kvm, tmp_path):
    # Readiness is the student's own mark, not the process tree: an ``unshare`` about to fork looks like
    # an innermost child, and counting it sent SIGINT before the second check had started (seen under load).
    marks = {name: tmp_path / f"{name}-in-solve" for name in ("a", "b", "c")}
    files = [str(_file(tmp_path, name, _hang_announced(mark))) for name, mark in marks.items()]
    grader = popen_interruptible(GRADE + ["1", *files, "--deadline", "120", "--jobs", "2"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    below: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 180           # start-up of two checks at load 20-30 took over 60 s
        while sum(mark.exists() for mark in marks.values()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        below = psutil.Process(grader.pid).children(recursive=True)
        assert sum(mark.exists() for mark in marks.values()) == 2, [p.cmdline() for p in below]   # two in solve()
        grader.send_signal(signal.SIGINT)
        started = time.monotonic()
        out, err = grader.communicate(timeout=60)
        assert time.monotonic() - started < STOP_GRACE          # each check stopped on SIGINT, none had to be killed
        assert grader.returncode == 130 and "Traceback" not in err and err.strip() == "interrupted"
    finally:
        if grader.poll() is None:                              # a failed assertion must not leave the class running
            for process in psutil.Process(grader.pid).children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()
            grader.kill()
            grader.wait()
    psutil.wait_procs(below, timeout=5)
    assert [p.pid for p in below if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []
