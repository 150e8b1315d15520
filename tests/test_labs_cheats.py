"""Cheats against ``labs check``: each one in tests/labs_cheats fails, with the checker's reason, and leaves nothing.

A cheat is a student's ``lab.py`` (or a folder holding one, and what the
student put beside it) naming its lab (``LAB``), the step the checker must
fail and why (``EXPECTED_FAILURES``, as in tests/labs_reference) and, if it
waits for a step's deadline, that deadline (``DEADLINE``). Each runs
``python -m pykvm.labs check`` in a process of its own (a cheat may stop or kill
its checker), on every host: these are hardware tests.
"""

from __future__ import annotations

import ast
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pykvm.core.stats import Stats
from pykvm.labs import get_lab, runner
from pykvm.labs.framework import STUDENT_FILE
from pykvm.labs.grade import grade
from pykvm.labs.runner import OUTPUT_LIMIT, isolation
from pykvm.labs.verdict import verified_stats
from pykvm.testing import popen_interruptible

pytestmark = [pytest.mark.deadline(900), pytest.mark.hardware]

CHEATS = Path(__file__).resolve().parent / "labs_cheats"
# A step's deadline unless the cheat names one: generous, since a check under QEMU TCG (tcg-amd) is slow;
# a cheat that stops or hangs names a short one and waits for it.
DEADLINE = 300
NEEDS_NAMESPACES = {"stop_the_checker", "kill_the_checker"}   # without them these reach the checker itself
NEEDS_TASK_CAP = {"fork_bomb"}     # uncapped (root without a pids cgroup) it would fill the host's PID table
# Cheats the checker must catch without waiting for the step's deadline (closed channel: seen within a
# poll of a silent step, though ``unshare`` keeps a copy of it open).
CAUGHT_BEFORE_THE_DEADLINE = {"closerange"}


def _constant(source: Path, name: str, default=None):
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", "") for t in node.targets] == [name]:
            return ast.literal_eval(node.value)
    if default is None:
        raise AssertionError(f"{source} has no {name} = ...")
    return default


def _student_file(cheat: Path) -> Path:
    return cheat / STUDENT_FILE if cheat.is_dir() else cheat


CHEAT_NAMES = sorted(path.stem for path in CHEATS.iterdir()      # a file, or a folder holding the student's file
                     if path.stem != "__init__" and (path.suffix == ".py" or (path / STUDENT_FILE).is_file()))


def _planted(name: str, tmp_path: Path) -> Path:
    """The cheat as a student's folder: ``DIR/lab.py`` (and whatever the cheat's folder holds)."""
    cheat = CHEATS / name if (CHEATS / name).is_dir() else CHEATS / f"{name}.py"
    directory = tmp_path / "student"
    if cheat.is_dir():
        shutil.copytree(cheat, directory)
    else:
        directory.mkdir()
        shutil.copy(cheat, directory / STUDENT_FILE)
    return directory


def _blocks(checklist: str) -> dict[int, str]:
    """Each step's lines of the checklist, by step number."""
    blocks: dict[int, str] = {}
    current = 0
    for line in checklist.splitlines():
        if line.startswith(("  [PASS] ", "  [FAIL] ")):
            current = int(line[9:].split(".")[0])
        elif not line.startswith("         "):
            current = 0
        if current:
            blocks[current] = blocks.get(current, "") + line + "\n"
    return blocks


def _left_running(directory: Path, grace: float = 5.0) -> list[int]:
    """Processes whose command line names the student's folder (the checker's child and all it forked)
    and that are still alive ``grace`` seconds on: a process already killed may take a moment to go
    (a PID namespace's members die after its init, and at load 20-30 that was seen still in the table)."""
    named = []
    for process in psutil.process_iter(["cmdline"]):
        if str(directory) in " ".join(process.info["cmdline"] or ()):
            named.append(process)
    _, alive = psutil.wait_procs(named, timeout=grace)
    return [process.pid for process in alive if process.status() != psutil.STATUS_ZOMBIE]


def _check(number: int, directory: Path, deadline: float = DEADLINE) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pykvm.labs", "check", str(number), str(directory),
                           "--deadline", str(deadline)], capture_output=True, timeout=deadline * 4 + 600,
                          stdin=subprocess.DEVNULL)


# The cheats whose defeat rests on what KVM counted (the stats fds the runner reads, the injections it
# was streamed): what KVM does there differs by host, so they run on every host. The others are beaten
# by the runner's own handling of its child (reports, signals, output, processes, the lab's rules on
# the student's code, the kernel's task cap): the same on every KVM, so they run once (host_independent),
# which keeps CI's emulated hosts, where each check costs about 30 s, within its budget.
JUDGED_BY_KVM = {"canned_held", "fake_stats_fd", "json_dumps_patch", "own_vm_takes_the_interrupts", "patch_pykvm",
                 "report_fd_forgery", "seed_reader", "trace_rewrite"}


@pytest.mark.parametrize("name", [name if name in JUDGED_BY_KVM else
                                  pytest.param(name, marks=pytest.mark.host_independent) for name in CHEAT_NAMES])
def test_cheat_fails_with_the_checkers_reason(kvm, tmp_path, name):
    if name in NEEDS_NAMESPACES and not isolation():
        pytest.skip("this host gives the checker's child no PID namespace: the cheat would stop the test itself")
    if name in NEEDS_TASK_CAP and not runner.tasks_capped():
        pytest.skip("as root without a writable pids cgroup nothing caps the check's tasks: a fork bomb would "
                    "fill the host's PID table")
    directory = _planted(name, tmp_path)
    student = _student_file(directory)
    number, expected = _constant(student, "LAB"), _constant(student, "EXPECTED_FAILURES")
    deadline = _constant(student, "DEADLINE", DEADLINE)
    started = time.monotonic()
    done = _check(number, directory, deadline)
    took = time.monotonic() - started
    out = done.stdout.decode(errors="replace")
    assert done.returncode == 1, out + done.stderr.decode(errors="replace")
    assert "lab complete" not in out and "\x1b" not in out
    blocks = _blocks(out)
    assert any(step in blocks and "[FAIL]" in blocks[step] and phrase in blocks[step] for step, phrase in expected), out
    assert took < deadline * 2 + 120, f"the check took {took:.0f} s"
    if name in CAUGHT_BEFORE_THE_DEADLINE:
        assert took < deadline / 2, f"the check took {took:.1f} s: it waited for the {deadline:g} s deadline"
    assert _left_running(directory) == []


@pytest.mark.host_independent       # the runner's own process handling: no KVM behaviour in it
def test_a_gigabyte_of_output_is_kept_to_its_first_64_kib_and_counted(kvm, tmp_path):
    directory = _planted("gigabyte_line", tmp_path)
    checklist = tmp_path / "checklist"
    with open(checklist, "wb") as stdout:           # a file: the checklist holds 64 KiB, more than a pipe's buffer
        check = subprocess.Popen([sys.executable, "-m", "pykvm.labs", "check", "1", str(directory), "--deadline",
                                  str(DEADLINE)], stdout=stdout, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    peak = 0
    with contextlib.suppress(psutil.NoSuchProcess):
        checker = psutil.Process(check.pid)
        while check.poll() is None:
            peak = max(peak, checker.memory_info().rss)
            time.sleep(0.02)
    check.wait(timeout=DEADLINE * 4)
    out = checklist.read_text(errors="replace")
    assert check.returncode == 1 and peak < 256 << 20, f"the checker's RSS peaked at {peak >> 20} MiB"
    shown = [line for line in out.splitlines() if line.startswith("  | ") and not line.startswith("  | ... and")]
    assert 0 < sum(len(line) - 4 for line in shown) <= OUTPUT_LIMIT
    dropped = int(out.split("... and ")[1].split(" more bytes")[0])
    assert dropped == (1 << 30) - OUTPUT_LIMIT


@pytest.mark.host_independent       # the runner's own process handling: no KVM behaviour in it
def test_a_daemon_the_students_code_left_is_ended_with_the_step(kvm, tmp_path):
    directory = _planted("setsid_daemon", tmp_path)
    done = _check(1, directory)
    assert (directory / "daemon.started").exists(), done.stdout.decode(errors="replace")   # it did run
    assert _left_running(directory) == []


@pytest.mark.host_independent       # the runner's own process handling: no KVM behaviour in it
def test_the_students_folder_is_not_the_checkers(kvm, tmp_path):
    """Control for the shadow cheat: the same folder, with a real solve(), passes (its fake child is ignored)."""
    directory = _planted("shadow_child", tmp_path)
    reference = Path(__file__).resolve().parent / "labs_reference" / "lab01.py"
    (directory / STUDENT_FILE).write_text(reference.read_text())
    done = _check(1, directory)
    assert done.returncode == 0 and b"lab complete" in done.stdout, done.stdout


@pytest.mark.host_independent
@pytest.mark.parametrize("wait", [0.0, 0.05, 0.2, 0.5, 1.0, 2.0])
def test_ctrl_c_ends_the_check_with_130_and_nothing_left(kvm, tmp_path, wait):
    directory = tmp_path / "hang"
    directory.mkdir()
    (directory / STUDENT_FILE).write_text("def solve(task):\n    while True:\n        pass\n")
    check = popen_interruptible([sys.executable, "-m", "pykvm.labs", "check", "1", str(directory)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        assert "Ctrl-C stops the check" in check.stderr.readline()           # ready: the check runs
        time.sleep(wait)
        tree = psutil.Process(check.pid).children(recursive=True)
        os.killpg(check.pid, signal.SIGINT)                                  # as a terminal's Ctrl-C
        out, err = check.communicate(timeout=60)
    finally:
        if check.poll() is None:
            check.kill()
            check.wait()
    assert check.returncode == 130, err
    assert "Traceback" not in out + err and "interrupted" in err
    assert [process.pid for process in tree if process.is_running() and process.status() != "zombie"] == []
    assert _left_running(directory) == []


@pytest.mark.host_independent
@pytest.mark.parametrize("name", ["report_fd_forgery", "setsid_daemon", "closerange", "step_out_of_range"])
def test_without_namespaces_the_cheats_fail_too_and_the_checklist_says_so(kvm, tmp_path, monkeypatch, name):
    """Where the host gives no PID and user namespaces: the child runs as this process's child (and its orphans
    are adopted, PR_SET_CHILD_SUBREAPER, to be ended with it)."""
    monkeypatch.setattr(runner, "isolation", lambda: ())
    directory = _planted(name, tmp_path)
    student = _student_file(directory)
    expected = _constant(student, "EXPECTED_FAILURES")
    report = runner.check(get_lab(_constant(student, "LAB")), student,
                          deadline=_constant(student, "DEADLINE", DEADLINE))
    assert not report.isolated and "offers no PID and user namespaces" in runner.format_report(report)
    assert any(not report.results[step - 1].passed and phrase in report.results[step - 1].detail
               for step, phrase in expected), runner.format_report(report)
    assert _left_running(directory) == [] and psutil.Process().children(recursive=True) == []


def test_a_stats_fd_is_accepted_only_as_kvms_for_a_process_of_the_check(kvm):
    """The runner's check of a vCPU stats fd: KVM's anon inode, made by a process of the check's tree."""
    mine = {os.getpid()}
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu()
        for tree, accepted in ((mine, True), ({os.getpid() + 1_000_000}, False)):
            with Stats.open(vcpu) as stats:
                verified, problem = verified_stats(os.dup(stats.fd), tree)
            assert (verified is not None) == accepted, problem
            assert accepted or "a VM made by no process of this check" in problem
            if verified is not None:
                assert verified.read()["exits"] == 0
                verified.close()
        vm_stats, problem = verified_stats(os.dup(vm.stats.fd), mine)          # a VM's, not a vCPU's
        assert vm_stats is None and "anon_inode:kvm-vm-stats" in problem
    eventfd = os.eventfd(0)
    fake, problem = verified_stats(eventfd, mine)
    assert fake is None and "not a vCPU stats fd made by KVM" in problem
    with pytest.raises(OSError):
        os.fstat(eventfd)                                                   # refused fds are closed


def _grading_groups() -> dict[tuple[int, float], list[str]]:
    """The cheats by (lab, step deadline): one ``labs grade`` run each."""
    groups: dict[tuple[int, float], list[str]] = {}
    for name in CHEAT_NAMES:
        student = _student_file(CHEATS / name if (CHEATS / name).is_dir() else CHEATS / f"{name}.py")
        groups.setdefault((_constant(student, "LAB"), _constant(student, "DEADLINE", DEADLINE)), []).append(name)
    return groups


@pytest.mark.host_independent     # grade runs `labs check --json` per file: the verdicts above, on every host
@pytest.mark.deadline(1800)
@pytest.mark.parametrize("number, deadline", [pytest.param(number, deadline, id=f"lab{number}-{deadline:g}s")
                                               for number, deadline in sorted(_grading_groups())])
def test_every_cheat_fails_when_graded_too(kvm, tmp_path, number, deadline):
    """``labs grade`` (each file copied alone, its check's JSON read back) fails every cheat with the same reason."""
    cheats = []
    for name in _grading_groups()[number, deadline]:
        if name in NEEDS_NAMESPACES and not isolation() or name in NEEDS_TASK_CAP and not runner.tasks_capped():
            continue                    # as above: the cheat would reach the grader's checks, or the host
        (tmp_path / name).mkdir()
        cheats.append((name, _student_file(_planted(name, tmp_path / name))))
    # side by side: most of them wait for their deadline
    rows = grade(number, [student for _, student in cheats], deadline=deadline, jobs=max(1, len(cheats)))
    for (name, student), row in zip(cheats, rows, strict=True):
        expected = _constant(student, "EXPECTED_FAILURES")
        assert row.graded and row.passed < row.total, (name, row)
        assert any(not row.steps[step - 1].passed and phrase in row.steps[step - 1].detail
                   for step, phrase in expected), (name, row.steps)
    assert [pid for name, _ in cheats for pid in _left_running(tmp_path / name)] == []


@pytest.mark.host_independent
@pytest.mark.parametrize("enabled, available, capped", [("pids", "cpu pids", True), ("", "cpu pids", True),
                                                         ("", "cpu", False)])
def test_a_unified_cgroup_caps_tasks_where_its_pids_controller_is_or_can_be_enabled(tmp_path, enabled, available,
                                                                                     capped):
    """cgroup v2 (the unified hierarchy, most hosts today): a check's cgroup gets the pids controller from its
    parent's subtree_control, enabled by the checker where the parent's controllers offer it."""
    (tmp_path / "cgroup.subtree_control").write_text(enabled)
    (tmp_path / "cgroup.controllers").write_text(available)
    assert runner._pids_enabled_below(tmp_path) == (tmp_path if capped else None)
    assert ("pids" in (tmp_path / "cgroup.subtree_control").read_text()) == capped


@pytest.mark.host_independent
def test_the_unified_hierarchy_is_found_where_the_kernel_mounted_it():
    mounted = [Path(p.mountpoint) for p in psutil.disk_partitions(all=True) if p.fstype == "cgroup2"]
    assert runner._unified_mount() == (mounted[0] if mounted else None)
