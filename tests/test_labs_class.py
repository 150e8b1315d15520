"""A class of 40 lab 1 files graded at once by ``python -m pykvm.labs grade``: the expected row for each.

The class: students with the reference (each gets their own task, ``--seed-from-name``),
one who prints, students with lab 1's wrong solution, and every lab 1 cheat of
tests/labs_cheats, hostile code included: an infinite loop, a fork bomb (stopped by the
check's task cap), a 20 GiB allocation (refused by the address-space limit), a setsid
daemon. Each file must get its row (steps passed, the step that failed and why), nothing
of the grading may be left running, the fork bomb may not pass the cap and the grader
itself must stay under :data:`GRADER_MEMORY`.

Forty checks take minutes: the ``class_grading`` marker keeps this out of a plain
``pytest`` run; ``pytest -m class_grading`` runs it (CI does, on its KVM machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from test_labs import REFERENCE, WRONG, _wrong_solution
from test_labs_cheats import CHEAT_NAMES, CHEATS, NEEDS_NAMESPACES, NEEDS_TASK_CAP, _constant, _student_file
from test_labs_grade import GRADE, GRADER_MEMORY

from pykvm.labs import get_lab
from pykvm.labs.child import TASK_LIMIT
from pykvm.labs.framework import STUDENT_FILE
from pykvm.labs.runner import PIDS_HIERARCHY, isolation, tasks_capped

pytestmark = [pytest.mark.deadline(1800), pytest.mark.class_grading, pytest.mark.hardware]

LAB = 1
CLASS_SIZE = 40
DEADLINE = 10              # seconds per step: the hanging files wait this long, once each
JOBS = 2
STEPS = len(get_lab(LAB).steps)
# Every process of one check: the grader's `labs check`, `unshare`, the namespace's PID 1, beside the capped tasks.
CHECK_OVERHEAD = 4


@pytest.fixture
def class_folder(tmp_path: Path) -> tuple[Path, dict[str, tuple[int, int, str]]]:
    """The class's files under ``tmp_path/class``, and each one's expected row: (passed, failed step, phrase).

    (Failed step 0: every step passes.) A cheat's phrase is its EXPECTED_FAILURES'; a cheat breaks its run
    of solve(), so every step that judges that run fails with it: lab 1 has no other, none passes.
    """
    folder = tmp_path / "class"
    folder.mkdir()
    expected: dict[str, tuple[int, int, str]] = {}
    for name in CHEAT_NAMES:
        cheat = CHEATS / name if (CHEATS / name).is_dir() else CHEATS / f"{name}.py"
        student = _student_file(cheat)
        if (_constant(student, "LAB") != LAB or (name in NEEDS_NAMESPACES and not isolation())
                or (name in NEEDS_TASK_CAP and not tasks_capped())):
            continue                            # (then a student with the reference takes the place)
        [(step, phrase)] = _constant(student, "EXPECTED_FAILURES")
        (folder / name).mkdir()                 # grade takes the file alone, even of a cheat's folder
        shutil.copyfile(student, folder / name / STUDENT_FILE)
        expected[name] = (0, step, phrase)
    (folder / "printing").mkdir()
    shutil.copyfile(REFERENCE / "lab01_printing.py", folder / "printing" / STUDENT_FILE)
    expected["printing"] = (STEPS, 0, "")
    [(wrong_step, wrong_phrase)] = WRONG["lab01_wrong_no_reply"]
    wrong_students = (CLASS_SIZE - len(expected)) // 4
    for index in range(wrong_students):
        _wrong_solution("lab01_wrong_no_reply", folder).parent.rename(folder / f"wrong-{index:02d}")
        expected[f"wrong-{index:02d}"] = (wrong_step - 1, wrong_step, wrong_phrase)
    for index in range(CLASS_SIZE - len(expected)):
        (folder / f"student-{index:02d}").mkdir()
        shutil.copyfile(REFERENCE / "lab01.py", folder / f"student-{index:02d}" / STUDENT_FILE)
        expected[f"student-{index:02d}"] = (STEPS, 0, "")
    return folder, expected


def _grading(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, int, int]:
    """Run the grader: its result, the largest RSS psutil saw of it, the most processes below it at once.

    (Counted from each process's parent, never its command line: reading that waits while the process forks.)
    """
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               stdin=subprocess.DEVNULL, text=True)
    grader, peak, most, tick = psutil.Process(process.pid), 0, 0, 0
    while process.poll() is None:
        with contextlib.suppress(psutil.NoSuchProcess):
            peak = max(peak, grader.memory_info().rss)
        if tick % 10 == 0:
            with contextlib.suppress(psutil.NoSuchProcess):
                most = max(most, len(grader.children(recursive=True)))
        tick += 1
        time.sleep(0.02)
    out, err = process.communicate()
    return subprocess.CompletedProcess(command, process.returncode, out, err), peak, most


def _naming(folder: Path) -> list[psutil.Process]:
    """The processes whose command line names ``folder`` (every process a check starts does)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if str(folder) in " ".join(process.info["cmdline"] or ()):
            found.append(process)
    return found


def _check_cgroups() -> set[Path]:
    """The checks' pids cgroups (none where the runner may make none)."""
    return set(PIDS_HIERARCHY.glob("**/pykvm-lab-*"))


def _left_cgroups(before: set[Path], grace: float = 10.0) -> set[Path]:
    """The checks' pids cgroups made since ``before`` that are left: empty, and still there ``grace`` s on.

    Once the grader and all its processes are gone, a cgroup of one of its checks holds no process; one that
    does belongs to a check another program runs on this machine at the same time, and is not this test's.
    """
    ends = time.monotonic() + grace
    while True:
        left = set()
        for cgroup in _check_cgroups() - before:
            with contextlib.suppress(OSError):              # removed as we look
                if not (cgroup / "cgroup.procs").read_text().split():
                    left.add(cgroup)
        if not left or time.monotonic() >= ends:
            return left
        time.sleep(0.2)


def test_a_class_of_40_gets_its_rows_leaves_nothing_and_the_grader_stays_small(kvm, tmp_path, class_folder):
    folder, expected = class_folder
    assert len(expected) == CLASS_SIZE
    scratch = tmp_path / "scratch"          # the grader's and the checks' temporary folders: all named by tmp_path
    scratch.mkdir()
    names = [f"class/{name}/{STUDENT_FILE}" for name in sorted(expected)]
    cgroups_before = _check_cgroups()
    started = time.monotonic()
    done, peak, most = _grading(GRADE + [str(LAB), *names, "--seed-from-name", "--json", "--jobs", str(JOBS),
                                         "--deadline", str(DEADLINE)], tmp_path,
                                {**os.environ, "TMPDIR": str(scratch)})
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    rows = {Path(row["file"]).parent.name: row for row in json.loads(done.stdout)["files"]}
    print(f"\n{CLASS_SIZE} files in {took:.0f} s with --jobs {JOBS}; the grader's RSS peaked at {peak >> 20} MiB, "
          f"at most {most} processes ran below it at once")
    for name in sorted(rows):
        row = rows[name]
        failed = next((s for s in row["steps"] if not s["passed"]), None)
        print(f"{name:22} {row['passed']}/{row['total']} {row['seconds']:5.1f} s  "
              + (f"{failed['step']}. {failed['detail'].splitlines()[0][:90]}" if failed else "-"))
    for name, (passed, step, phrase) in expected.items():
        row = rows[name]
        assert row["graded"] and (row["passed"], row["total"]) == (passed, STEPS), (name, row)
        if step:
            assert not row["steps"][step - 1]["passed"] and phrase in row["steps"][step - 1]["detail"], (name, row)
    assert peak < GRADER_MEMORY, f"the grader's RSS reached {peak >> 20} MiB"
    assert most <= JOBS * (TASK_LIMIT + CHECK_OVERHEAD), f"{most} processes at once: the fork bomb was not capped"
    assert [process.pid for process in _naming(tmp_path)] == []
    assert _left_cgroups(cgroups_before) == set(), "a check's pids cgroup was left"
    assert psutil.Process().children(recursive=True) == []
