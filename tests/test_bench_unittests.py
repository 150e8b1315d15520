"""``python -m pykvm.bench unittests``: the entries measured, the order of the runs, the arithmetic, the report.

Stand-in runners (no KVM, no QEMU) check the selection, the rotation and the
figures; one hardware run uses a stand-in tree as ``tests/test_unittests.py``
does (pykvm's exitcode kernel under cfg entries, a stand-in ``x86/run``), so
both runners are real commands there. With ``PYKVM_KUT_DIR`` naming a built
kvm-unit-tests tree and QEMU installed, one real entry is measured too.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import pytest

from pykvm.bench import main
from pykvm.hosts import VendorModule
from pykvm.unittests.bench import TARGET, WAYS, Conditions, Result, Run, Sample, conditions, measure, qualify, rotation
from pykvm.unittests.config import Entry
from pykvm.vmm import ExitSite

QUIET = Conditions("kvm_intel", 8, (0.1, 0.2, 0.3), (1.1, 0.4, 0.3), "/usr/bin/qemu, QEMU emulator version 9.9")


class StandIns:
    """Runners that answer from a script (entry -> way -> lines, one per call) and log every call."""

    def __init__(self, script: dict[str, dict[str, list[str]]]):
        self.script = script
        self.calls: list[tuple[str, str]] = []

    def ways(self):
        def runner(way: str):
            def run(entry: Entry) -> Run:
                line = self.script[entry.name][way][sum(call == (entry.name, way) for call in self.calls)]
                self.calls.append((entry.name, way))
                return Run(line, line.startswith("PASS"), 0.001 if way == "in-process" else None)
            return run
        return {way: runner(way) for way in WAYS}


def entries(*names: str) -> list[Entry]:
    return [Entry(name, f"{name}.flat") for name in names]


def passing(name: str, runs: int) -> dict[str, list[str]]:
    return {way: [f"PASS {name}"] * runs for way in WAYS}


# -- which entries are measured ------------------------------------------------------------------

def test_only_entries_passing_under_both_are_measured_and_the_others_are_named():
    stand_ins = StandIns({"both": passing("both", 1),
                          "pykvm_fails": {"in-process": ["FAIL pykvm_fails (1 tests, 1 unexpected failures)"]},
                          "qemu_skips": {"in-process": ["PASS qemu_skips"], "qemu": ["SKIP qemu_skips (no -cpu)"]}})
    said: list[str] = []
    kept, left_out = qualify(entries("both", "pykvm_fails", "qemu_skips"), stand_ins.ways(), said.append)
    assert [entry.name for entry in kept] == ["both"]
    assert left_out == {
        "pykvm_fails": "under pykvm: FAIL pykvm_fails (1 tests, 1 unexpected failures) (QEMU not run)",
        "qemu_skips": "under QEMU: SKIP qemu_skips (no -cpu) (pykvm: PASS qemu_skips)"}
    assert ("pykvm_fails", "qemu") not in stand_ins.calls          # a pykvm failure is enough to leave it out
    assert said == ["  both: measured", f"  pykvm_fails: left out, {left_out['pykvm_fails']}",
                    f"  qemu_skips: left out, {left_out['qemu_skips']}"]


def test_an_entry_that_fails_a_timed_run_is_dropped_with_the_round_and_the_way():
    flaky = passing("flaky", 2)
    flaky["command"] = ["PASS flaky", "FAIL flaky (timeout; duration=90s)"]
    stand_ins = StandIns({"steady": passing("steady", 2), "flaky": flaky})
    samples, dropped = measure(entries("steady", "flaky"), stand_ins.ways(), 2, lambda line: None)
    assert list(samples) == ["steady"] and all(len(samples["steady"][way]) == 2 for way in WAYS)
    assert dropped == {"flaky": "round 2, pykvm command: FAIL flaky (timeout; duration=90s)"}
    assert stand_ins.calls.count(("flaky", "qemu")) == 1           # round 2 starts with the command, then stops


# -- the order of the runs -----------------------------------------------------------------------

def test_each_round_runs_every_entry_every_way_in_an_order_that_rotates_per_round():
    stand_ins = StandIns({"a": passing("a", 3), "b": passing("b", 3)})
    said: list[str] = []
    measure(entries("a", "b"), stand_ins.ways(), 3, said.append)
    first, second, third = ("in-process", "command", "qemu"), ("command", "qemu", "in-process"), \
        ("qemu", "in-process", "command")
    expected = [(name, way) for order in (first, second, third) for name in "ab" for way in order]
    assert stand_ins.calls == expected
    assert [rotation(index)[0] for index in range(4)] == ["in-process", "command", "qemu", "in-process"]
    assert said[2] == "  round 3 of 3: QEMU x86/run, pykvm in-process, pykvm command"


# -- the arithmetic and the report ---------------------------------------------------------------

def samples(walls: list[float], cpu_share: float = 1.0, elapsed: float | None = None) -> list[Sample]:
    return [Sample(Run("PASS x", True, elapsed), wall, wall * cpu_share) for wall in walls]


def result(command: list[float], left_out: dict[str, str] | None = None, on: Conditions = QUIET) -> Result:
    return Result(3, {"a": {"in-process": samples([0.2, 0.1, 0.3], 0.5, 0.05), "command": samples(command),
                            "qemu": samples([10.0, 30.0, 20.0])},
                      "b": {"in-process": samples([0.1, 0.1, 0.1], 0.5, 0.05), "command": samples([1.0, 1.0, 1.0]),
                            "qemu": samples([2.0, 4.0, 3.0], 0.5)}}, left_out or {}, on)


def test_medians_per_entry_ratios_and_totals():
    figures = result([4.0, 6.0, 5.0])
    assert figures.median("a", "qemu") == 20.0 and figures.median("a", "in-process") == 0.2
    assert (figures.total("qemu"), figures.total("command"), figures.total("in-process")) == pytest.approx((23, 6, 0.3))
    assert figures.ratio("command") == pytest.approx(6 / 23) and figures.ratio("in-process") == pytest.approx(0.3 / 23)
    assert figures.total("qemu", cpu=True) == 21.5 and figures.ratio("command", cpu=True) == pytest.approx(6 / 21.5)
    lines = figures.report()
    table = next(index for index, line in enumerate(lines) if "seconds, median" in line)
    assert lines[table + 1].split() == ["a", "0.200", "5.000", "20.000", "0.010", "0.250"]
    assert lines[table + 2].split() == ["b", "0.100", "1.000", "3.000", "0.033", "0.333"]
    assert lines[table + 3].split() == ["total", "0.300", "6.000", "23.000", "0.013", "0.261"]


def test_the_target_is_judged_on_the_command_total_and_printed_either_way():
    missed = "\n".join(result([4.0, 6.0, 5.0]).report())       # 6 / 23 = 0.261
    assert "headline: pykvm command total / QEMU total = 0.261; target <= 1/4: NOT met" in missed
    met = "\n".join(result([4.0, 4.5, 5.0]).report())          # 5.5 / 23 = 0.239
    assert "= 0.239; target <= 1/4: met" in met and 5.5 / 23 <= TARGET < 6 / 23
    assert "per command here, a median 2.850 s" in missed     # of (5 - 0.2, 1 - 0.1): Python's start-up


def test_the_cross_checks_compare_the_machines_clock_and_cpu_time_with_wall_time():
    text = "\n".join(result([4.0, 6.0, 5.0]).report())
    assert ("the Machine's own clock (BootResult.elapsed, run() to the guest's end) sums to 0.300 s of the "
            "0.900 s measured around run_pykvm() (33%") in text
    assert "inside the measured time in 6 of 6 runs" in text
    assert "pykvm in-process 0.50, pykvm command 1.00, QEMU x86/run 0.93" in text    # 21.5 / 23
    assert "command/QEMU by CPU time 0.279 against 0.261 by wall time (they differ by 7%)" in text


def test_the_floor_is_the_guests_own_time_in_the_in_process_runs_against_qemus_total():
    figures = result([4.0, 6.0, 5.0])
    assert "floor" not in "\n".join(figures.report())        # control: runs that did not measure the guest's time
    guests = {"a": [0.16, 0.05, 0.25], "b": [0.09, 0.09, 0.09]}
    for name, times in guests.items():
        runs = figures.samples[name]["in-process"]
        runs[:] = [dataclasses.replace(sample, run=dataclasses.replace(sample.run, guest=guest))
                   for sample, guest in zip(runs, times, strict=True)]
    assert figures.guest("a") == 0.16
    text = "\n".join(figures.report())
    assert "    a: 0.160 s, 0.008\n    b: 0.090 s, 0.030" in text           # of QEMU's medians 20 and 3
    assert ("floor: that guest time totals 0.250 s, 0.011 of QEMU's total (the ratio if pykvm's own time were "
            "nil" in text)
    assert "pykvm's own, the command total less it, 5.750 s (0.250 of QEMU's total" in text
    assert "QEMU's total less the same guest time, 22.750 s" in text


def test_the_floor_is_cross_checked_by_the_kernels_time_after_their_first_byte_under_qemu():
    figures = result([4.0, 6.0, 5.0])
    for name in figures.samples:
        runs = figures.samples[name]["in-process"]
        runs[:] = [dataclasses.replace(sample, run=dataclasses.replace(sample.run, guest=0.1)) for sample in runs]
    assert "cross-check of the floor" not in "\n".join(figures.report())    # control: no first byte was timed
    after_first_byte = {("a", "qemu"): [9.0, 8.0, 7.0], ("b", "qemu"): [1.0, 1.0, 1.5],
                        ("a", "in-process"): [0.05, 0.06, 0.07], ("b", "in-process"): [0.02, 0.01, 0.03]}
    for (name, way), times in after_first_byte.items():
        figures.samples[name][way][:] = [dataclasses.replace(sample, run=dataclasses.replace(sample.run, kernel=time))
                                         for sample, time in zip(figures.samples[name][way], times, strict=True)]
    assert figures.kernel("a", "qemu") == 8.0
    text = "\n".join(figures.report())
    assert ("cross-check of the floor, from each kernel's first output byte to the run's end (median, summed): "
            "under QEMU 9.000 s, 0.391 of QEMU's total; under pykvm 0.080 s (the guest time above: 0.200 s)") in text


def test_each_entry_shows_its_time_outside_kvm_run_and_its_busiest_exit_sites():
    figures = result([4.0, 6.0, 5.0])
    timer, thr, lsr, mmio = (ExitSite("io", 0x608, False), ExitSite("io", 0x3F8, True), ExitSite("io", 0x3FD, False),
                             ExitSite("mmio", 0xFED00000, True))
    # a's runs: (elapsed, guest, sites); the median run by exits is the second
    runs = [(0.5, 0.3, {timer: 900, thr: 10, lsr: 10}), (0.6, 0.3, {timer: 1000, thr: 10, lsr: 10, mmio: 2}),
            (0.7, 0.3, {timer: 1100, thr: 10, lsr: 10})]
    figures.samples["a"]["in-process"][:] = [
        dataclasses.replace(sample, run=Run("PASS a", True, elapsed, guest, counted))
        for sample, (elapsed, guest, counted) in zip(figures.samples["a"]["in-process"], runs, strict=True)]
    figures.samples["b"]["in-process"][:] = [
        dataclasses.replace(sample, run=dataclasses.replace(sample.run, guest=0.05))
        for sample in figures.samples["b"]["in-process"]]
    assert figures.outside("a") == (pytest.approx(0.3), runs[1][2])
    assert figures.outside("b") is None                 # control: runs that did not count their exits
    text = "\n".join(figures.report())
    assert ("    a: 0.300 s, 0.015; outside KVM_RUN 0.300 s, 1022 IO/MMIO exits to userspace, "
            "in port 0x608 1000, out port 0x3f8 10, in port 0x3fd 10\n    b: 0.050 s, 0.017\n") in text


def test_the_conditions_and_the_entries_left_out_are_printed():
    text = "\n".join(result([5.0] * 3, {"vmx": "under QEMU: SKIP vmx (no vmx)"}).report())
    assert ("conditions: host kvm_intel, 8 CPUs, load average (1, 5, 15 min) 0.10 0.20 0.30 at start, "
            "1.10 0.40 0.30 at end") in text
    assert "QEMU: /usr/bin/qemu, QEMU emulator version 9.9" in text
    assert "loaded by other work" not in text                          # control: a quiet machine
    assert text.endswith("left out: vmx: under QEMU: SKIP vmx (no vmx)")
    busy = dataclasses.replace(QUIET, load_start=(3.5, 3.0, 2.0))
    assert "the machine was loaded by other work (1-minute load average >= 1 at start)" in \
        "\n".join(result([5.0] * 3, on=busy).report())


def test_the_conditions_are_read_from_this_machine(tmp_path):
    qemu = tmp_path / "qemu"
    qemu.write_text("#!/bin/sh\necho 'QEMU emulator version 9.9 (stand-in)'\n")
    qemu.chmod(0o755)
    here = conditions((0.5, 0.25, 0.125), str(qemu))
    assert here.vendor in {vendor.value for vendor in VendorModule} and here.cpus == os.cpu_count()
    assert here.load_start == (0.5, 0.25, 0.125) and len(here.load_end) == 3
    assert here.qemu == f"{qemu}, QEMU emulator version 9.9 (stand-in)"
    assert conditions((0, 0, 0), None).qemu.startswith("not found on PATH")


# -- the command line ----------------------------------------------------------------------------

def test_bad_trees_names_and_rounds_are_refused(tmp_path, capsys):
    assert main(["unittests", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "x86").mkdir()
    (tmp_path / "x86" / "unittests.cfg").write_text("[smptest]\nfile = smptest.flat\n")
    assert main(["unittests", str(tmp_path), "smptset"]) == 2
    assert "did you mean smptest?" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stopped:
        main(["unittests", str(tmp_path), "--rounds", "0"])
    assert stopped.value.code == 2 and "expected at least one round" in capsys.readouterr().err


# -- hardware: a stand-in tree, both runners real commands ----------------------------------------

CFG = """\
[passes]
file = exitcode.flat
test_args = exit=0

[fails]
file = exitcode.flat
test_args = exit=1

[qemu_fails]
file = exitcode.flat
test_args = qemufail
"""

STAND_IN_RUN = """#!/bin/bash
# Stands in for the tree's x86/run: logs its call, fails the entry asking for it, passes the others.
echo "$TESTNAME" >> "$(dirname "$0")/calls"
case "$*" in
    *qemufail*) echo "FAIL: stand-in"; exit 3 ;;
    *) echo "PASS: stand-in"; echo "SUMMARY: 1 tests"; exit 0 ;;
esac
"""


@pytest.fixture
def tree(stand_in_kut_tree, tmp_path: Path, monkeypatch) -> Path:
    root = stand_in_kut_tree(CFG, STAND_IN_RUN)
    (tmp_path / "qemu").write_text("#!/bin/sh\necho 'QEMU emulator version 9.9 (stand-in)'\n")
    (tmp_path / "qemu").chmod(0o755)
    monkeypatch.setenv("QEMU", str(tmp_path / "qemu"))
    return root


def test_a_stand_in_tree_is_measured_with_real_runs(kvm_available, tree, capsys):
    assert main(["unittests", str(tree), "passes", "fails", "qemu_fails", "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    assert (tree / "x86" / "calls").read_text().split() == ["passes", "qemu_fails", "passes", "passes"]
    assert "unittests: 1 entries PASS under both pykvm and QEMU, 2 rounds" in out
    assert f"QEMU: {tree / 'qemu'}, QEMU emulator version 9.9 (stand-in)" in out
    row = next(line for line in out.splitlines() if line.startswith("  passes "))
    in_process, command, qemu, *ratios = (float(word) for word in row.split()[1:])
    assert 0 < in_process < command and qemu > 0          # the command pays Python's start-up on top
    assert "inside the measured time in 2 of 2 runs" in out
    assert "floor: that guest time totals" in out          # the Machine measured the guest's own time
    assert "cross-check of the floor" in out                # both kernels printed: their first bytes were timed
    assert "left out: fails: under pykvm: FAIL fails (QEMU not run)" in out
    assert "left out: qemu_fails: under QEMU: FAIL qemu_fails (pykvm: PASS qemu_fails)" in out


# -- a real kvm-unit-tests tree (PYKVM_KUT_DIR) ------------------------------------------------------

@pytest.mark.qemu
@pytest.mark.skipif(not shutil.which("qemu-system-x86_64"), reason="qemu-system-x86_64 is not installed")
def test_a_real_entry_is_measured_against_qemu(kvm_available, kut_tree, capsys):
    assert main(["unittests", str(kut_tree), "smptest", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "unittests: 1 entries PASS under both" in out and "headline: pykvm command total / QEMU total" in out
