"""What the lab sheets tell a student works as written: their commands, their questions, their facts.

A newcomer found sheets whose commands worked only from the clone's root, questions the
student's code could not observe (lab 5's RIP, lab 13's MP states) and claims KVM does not
bear out (lab 10's address_hi); these tests hold each sheet to what was fixed. The
questions and facts run on this machine's /dev/kvm (the ``kvm`` fixture skips them
elsewhere); the sheets' text and the shadowing folder need no KVM.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_labs import REFERENCE

import pykvm
from pykvm.core.constants import ExitReason, MpState
from pykvm.guests import Command
from pykvm.irqchip import MsiMessage
from pykvm.labs import all_labs, get_lab
from pykvm.labs.framework import STUDENT_FILE
from pykvm.labs.runner import check, format_report

pytestmark = pytest.mark.deadline(600)


def _check_line(number: int) -> str:
    """The sheet's "**Check:**" paragraph."""
    sheet = get_lab(number).sheet
    return sheet[sheet.index("**Check:**"):].split("\n\n")[0]


# -- the commands a sheet gives ------------------------------------------------------------------

@pytest.mark.parametrize("number", [lab.number for lab in all_labs()])
def test_every_sheet_checks_from_the_students_folder(number):
    line = _check_line(number)
    commands = re.findall(r"`(python [^`]*lab\.py)`", line)
    assert commands == [f"python -m pykvm.labs check {number} {STUDENT_FILE}", f"python {STUDENT_FILE}"]
    assert ".venv/bin/python -m" not in get_lab(number).sheet       # relative to a clone's root: not a student's


@pytest.mark.host_independent
def test_the_sheets_and_starts_commands_run_in_the_students_folder(kvm, tmp_path):
    folder = tmp_path / "my lab 5"
    start = subprocess.run([sys.executable, "-m", "pykvm.labs", "start", "5", str(folder)], capture_output=True,
                           text=True, timeout=120)
    assert start.returncode == 0, start.stderr
    printed = start.stdout.splitlines()[-1]
    assert printed.startswith(f"check your work in {folder}: ")
    commands = [shlex.split(printed.split(": ", 1)[1])]
    commands += [[sys.executable, *command.split()] for command in re.findall(r"`python ([^`]*lab\.py)`",
                                                                                    _check_line(5))]
    for command in commands:
        result = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=300)
        assert result.returncode == 1, result.stderr                  # the untouched starter fails step 1
        assert "Lab 5: The interrupt window" in result.stdout and "[FAIL] 1." in result.stdout


# -- lab 5, question 1: the exit by name, the RIP, the guest's record ------------------------------

PRINTING_CONTROLLER = """
    class Controller:
        def __init__(self, vcpu):
            self.vcpu, self.pending = vcpu, set()

        def queue(self, vector):
            self.pending.add(vector)

        def before_entry(self):
            run = self.vcpu.kvm_run
            print("exit", run.exit_reason, run.ready_for_interrupt_injection, hex(self.vcpu.regs.rip))
            if self.pending and run.ready_for_interrupt_injection:
                vector = max(self.pending)
                self.pending.discard(vector)
                print("inject", hex(vector))
                self.vcpu.interrupt(vector)
            run.request_interrupt_window = bool(self.pending)
"""


@pytest.mark.injection
def test_lab5_question1_the_controller_sees_the_exit_by_name_and_the_rip_the_guest_logs(kvm, host, tmp_path):
    student = tmp_path / STUDENT_FILE
    student.write_text(textwrap.dedent(PRINTING_CONTROLLER))
    report = check(get_lab(5), student, deadline=120)
    assert report.passed, format_report(report)
    lines = report.output.splitlines()
    injected = next(i for i, line in enumerate(lines) if line.startswith("inject"))
    _, reason, ready, rip = lines[injected - 1].split()
    assert reason in ExitReason.__members__ and ready == "1"        # the exit by name, not exit_reason=2
    vector, logged = re.search(r"the guest's log: (0x[0-9a-f]+) taken at RIP (0x[0-9a-f]+)",
                               report.results[2].detail).groups()
    assert vector == lines[injected].split()[1]
    if reason == ExitReason.IO.name and host.io_exit_rip_at_out:    # KVM finishes the OUT, then injects
        assert 0 < int(logged, 16) - int(rip, 16) <= 2
    else:
        assert logged == rip


# -- lab 13, question 1: the APs' MP states, by name ----------------------------------------------

def test_mp_state_and_exit_reason_print_by_name_and_compare_as_numbers():
    assert str(MpState.INIT_RECEIVED) == f"{MpState.INIT_RECEIVED}" == "INIT_RECEIVED"
    assert MpState.HALTED == 3 and f"{MpState.HALTED:d}" == "3" and int(MpState.HALTED) == 3
    assert str(ExitReason.IRQ_WINDOW_OPEN) == "IRQ_WINDOW_OPEN" and ExitReason.IO == 2


@pytest.mark.host_independent
def test_lab13_question1_send_init_can_print_every_aps_mp_state(kvm, tmp_path):
    student = tmp_path / STUDENT_FILE
    student.write_text((REFERENCE / "lab13.py").read_text() + textwrap.dedent("""

        _send_init = send_init

        def send_init(task):
            print("before", [str(ap.mp_state) for ap in task.aps], "ap_id", task.ap_id)
            _send_init(task)
            print("after", [str(ap.mp_state) for ap in task.aps])
    """))
    report = check(get_lab(13), student, deadline=120)
    assert report.results[0].passed and report.results[1].passed, format_report(report)
    before, ap_id = re.search(r"before (\[.*\]) ap_id (\d)", report.output).groups()
    after = re.search(r"after (\[.*\])", report.output).group(1)
    assert before == "['UNINITIALIZED', 'UNINITIALIZED']"
    wanted = ["UNINITIALIZED", "UNINITIALIZED"]
    wanted[int(ap_id) - 1] = "INIT_RECEIVED"
    assert after == str(wanted)


# -- lab 10: KVM reads no address_hi outside x2APIC's 32-bit IDs -----------------------------------

def test_lab10_kvm_ignores_address_hi_and_delivers_to_address_lo(machine):
    cpus = machine(irqchip="kernel", cpus=2)
    vm = cpus[0].vcpu.vm
    for cpu in cpus:
        cpu.apic_enable()
        cpu.command(Command.STI)

    def taken(address_lo: int, address_hi: int, vector: int) -> list[list[int]]:
        counts = [cpu.log_count() for cpu in cpus]
        assert vm.signal_msi(MsiMessage(address_lo, address_hi, vector)) == 1       # KVM delivered it
        for cpu in cpus:
            cpu.command(Command.NOP)                   # an entry with IF=1: a pending vector is taken
        return [[r.vector for r in cpu.records_since(count)] for cpu, count in zip(cpus, counts, strict=True)]

    assert taken(0xFEE00000 | 1 << 12, 0, 0x51) == [[], [0x51]]            # control: APIC ID 1 in address_lo
    # APIC ID 1 in address_hi (hardware: a memory write above 4 GiB): KVM reads APIC ID 0 from address_lo
    assert taken(0xFEE00000, 1, 0x52) == [[0x52], []]
    assert taken(0xFEE00000, 2, 0x53) == [[0x53], []]


# -- a folder named pykvm where the command runs ---------------------------------------------------

def _clone_named_pykvm(folder: Path) -> None:
    """What a clone of pykvm's repository looks like to Python: a folder pykvm without __init__.py."""
    for name in ("guests", "tests", "csrc"):
        (folder / "pykvm" / name).mkdir(parents=True)
    (folder / "pykvm" / "setup.py").write_text("")


# An editable install through setuptools' import hook (a finder on sys.meta_path, asked after the folders of
# sys.path), as pip makes for a project whose package does not sit at its top: this sitecustomize takes the
# clone's folder off sys.path and puts such a hook in its place.
_IMPORT_HOOK = """
import importlib.machinery, importlib.util, os, sys
ROOT = {root!r}
sys.path[:] = [entry for entry in sys.path if not entry or os.path.realpath(entry) != ROOT]
PACKAGE = os.path.join(ROOT, "pykvm")
class Hook:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "pykvm":
            return importlib.util.spec_from_file_location(name, os.path.join(PACKAGE, "__init__.py"),
                                                          submodule_search_locations=[PACKAGE])
        if name.count(".") == 1 and name.startswith("pykvm."):       # the package's modules, wherever pykvm is
            return importlib.machinery.PathFinder.find_spec(name, [PACKAGE])
        return None
sys.meta_path.append(Hook)
"""


def _through_an_import_hook(tmp_path: Path) -> dict[str, str]:
    """The environment of a Python that finds this pykvm through an import hook, as above."""
    root = Path(pykvm.__file__).resolve().parent.parent
    if "-packages" in root.name:
        pytest.skip(f"a regular install ({root}): no import hook to stand in for")
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_IMPORT_HOOK.format(root=str(root)))
    return {**os.environ, "PYTHONPATH": str(hook)}


@pytest.mark.host_independent
def test_a_clone_named_pykvm_in_the_folder_is_named_with_the_fix(tmp_path):
    _clone_named_pykvm(tmp_path)
    probe = [sys.executable, "-c", "import pykvm; print(getattr(pykvm, '__file__', None))"]
    # The control: this suite's install (the clone's folder on sys.path) is not shadowed.
    assert subprocess.run(probe, cwd=tmp_path, capture_output=True, text=True, timeout=120).stdout.strip() != "None"
    env = _through_an_import_hook(tmp_path)
    found = subprocess.run(probe, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert found.stdout.strip() == "None", found          # the folder was taken for the package
    start = subprocess.run([sys.executable, "-m", "pykvm.labs", "start", "1", "mine"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120, env=env)
    assert start.returncode == 2 and "Traceback" not in start.stderr
    assert f"the folder {tmp_path / 'pykvm'} shadows the installed pykvm package" in start.stderr
    assert "python -P -m pykvm.labs" in start.stderr and not (tmp_path / "mine").exists()
    imported = subprocess.run([sys.executable, "-c", "import pykvm.labs"], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120, env=env)
    assert "pykvm.labs.shadowing.ShadowedPackage: the folder" in imported.stderr
    if sys.version_info < (3, 11):
        return                                        # python -P came with 3.11
    fixed = subprocess.run([sys.executable, "-P", "-m", "pykvm.labs", "start", "1", "mine"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120, env=env)        # the fix the message gives
    assert fixed.returncode == 0, fixed.stderr
    assert (tmp_path / "mine" / STUDENT_FILE).read_text() == get_lab(1).starter
