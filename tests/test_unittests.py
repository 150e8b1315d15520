"""kvm-unit-tests on pykvm (pykvm.unittests): the cfg as the tree's runner reads it, verdicts, reports, the command.

A tree made here holds pykvm's own ``exitcode`` test kernel under cfg
entries, so the verdicts are checked against a kernel whose exit is known:
``exit=0`` is kvm-unit-tests' pass (status 1), ``exit=1`` a failure (3),
``exit=38`` a skip (77). With ``PYKVM_KUT_DIR`` naming a built kvm-unit-tests
tree, a few real entries run too, and the pytest option collects that tree.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import psutil
import pytest

from pykvm.unittests import ConfigError, Verdict, read_config, run_pykvm, runner
from pykvm.unittests.__main__ import _qemu_binary, main
from pykvm.unittests.config import DEFAULT_TIMEOUT, parse_config, parse_timeout, shell_words
from pykvm.unittests.plan import plan
from pykvm.unittests.report import Parity, junit, parity_summary, parity_table, tap
from pykvm.unittests.runner import EntryResult, qemu_command, run_qemu, skip_reason, summary_of

CFG = '''\
##############################################################################
# a comment
[passes]
file = exitcode.flat
test_args = exit=0
groups = quick

[fails]
file = exitcode.flat
smp = 2
test_args = 'exit=1'
timeout = 30s

[skips]
file = exitcode.flat
test_args = "exit=38"
groups = quick other

[hangs]
file = exitcode.flat
test_args = hang
timeout = 1

[i386_only]
file = exitcode.flat
arch = i386

[manual]
file = exitcode.flat
groups = nodefault

[needs_a_device]
file = exitcode.flat
qemu_params = -device virtio-rng-pci -m 256

[block]
file = exitcode.flat
qemu_params = """-m 64
-enable-kvm"""
'''


@pytest.fixture
def tree(stand_in_kut_tree) -> Path:
    return stand_in_kut_tree(CFG)


# -- the cfg ------------------------------------------------------------------------------------

def test_the_cfg_is_read_as_the_trees_runner_reads_it(tree):
    entries = {entry.name: entry for entry in read_config(tree)}
    assert list(entries) == ["passes", "fails", "skips", "hangs", "i386_only", "manual", "needs_a_device", "block"]
    assert entries["fails"].smp == "2" and entries["fails"].timeout == 30
    assert entries["skips"].groups == ("quick", "other") and entries["passes"].timeout == DEFAULT_TIMEOUT
    assert entries["block"].qemu_params == "-m 64 -enable-kvm"           # a triple-quoted block
    assert shell_words(entries["skips"].test_args, tree) == ["exit=38"]  # quotes removed by the shell
    assert shell_words("10000000 `echo 42`", tree) == ["10000000", "42"]     # backticks, as eval does


def test_bad_cfgs_and_trees_are_named(tmp_path):
    with pytest.raises(ConfigError, match="tree=.*does not exist.*run_tests.sh"):
        read_config(tmp_path)
    with pytest.raises(ConfigError, match=r"\[broken\] has no 'file = NAME.flat'"):
        parse_config("[broken]\nsmp = 1\n")
    with pytest.raises(ConfigError, match="never closed"):
        parse_config('[x]\nfile = a.flat\nqemu_params = """-m 1\n')
    with pytest.raises(ConfigError, match="timeout = '-3'"):
        parse_timeout("-3", "timeout")
    assert parse_timeout("2m", "timeout") == 120 and parse_timeout("1.5", "timeout") == 1.5


def test_the_plan_turns_qemu_parameters_into_machine_keywords_or_named_reasons(tree):
    entries = {entry.name: entry for entry in read_config(tree)}
    block = plan(entries["block"], tree)
    assert (block.memory, block.cpus, block.missing) == (64, 1, ())
    assert plan(entries["fails"], tree).cpus == 2 and plan(entries["fails"], tree).args == "exit=1"
    device = plan(entries["needs_a_device"], tree)
    assert device.memory == 256 and any("-device virtio-rng-pci" in reason for reason in device.missing)


def test_the_runners_conditions_skip_as_run_tests_sh_does(tree):
    entries = {entry.name: entry for entry in read_config(tree)}
    assert skip_reason(entries["i386_only"], tree) == "i386 only"
    assert skip_reason(entries["manual"], tree) == "test marked as manual run only"
    assert skip_reason(entries["manual"], tree, group="nodefault") == ""      # named by its group: it runs
    assert skip_reason(entries["passes"], tree) == ""


def test_the_qemu_command_is_the_trees_own_x86_run_line(tree):
    entry = read_config(tree)[1]
    assert qemu_command(entry, tree) == ("TESTNAME=fails TIMEOUT=30s MACHINE='' ACCEL=kvm ./x86/run "
                                         "x86/exitcode.flat -smp 2 -append 'exit=1'")


def test_summary_is_a_summary_line_among_the_last_five():
    assert summary_of("PASS: a\nSUMMARY: 3 tests, 1 unexpected failures\n") == "(3 tests, 1 unexpected failures)"
    assert summary_of("SUMMARY: 3 tests\n1\n2\n3\n4\n5\n") == ""           # too early: the runner misses it too


# -- verdicts from a kernel whose exit is known (hardware) ---------------------------------------

@pytest.mark.parametrize("name, verdict, status", [("passes", Verdict.PASS, 1), ("fails", Verdict.FAIL, 3),
                                                   ("skips", Verdict.SKIP, 77)])
def test_the_debug_exit_status_is_the_verdict(kvm_available, tree, name, verdict, status):
    entry = next(entry for entry in read_config(tree) if entry.name == name)
    outcome = run_pykvm(entry, tree)
    assert (outcome.verdict, outcome.status) == (verdict, status), outcome
    assert "command line:" in outcome.output and outcome.line().startswith(f"{verdict.value} {name}")


def test_a_hang_is_a_timeout_failure_and_a_skipped_entry_is_not_booted(kvm_available, tree):
    entries = {entry.name: entry for entry in read_config(tree)}
    hang = run_pykvm(entries["hangs"], tree)
    assert hang.verdict == Verdict.FAIL and hang.line() == "FAIL hangs (timeout; duration=1s)"
    device = run_pykvm(entries["needs_a_device"], tree)
    assert device.verdict == Verdict.SKIP and device.status is None and "-device virtio-rng-pci" in device.reason


def test_the_command_prints_the_runners_lines_writes_reports_and_exits_1_on_a_failure(kvm_available, tree,
                                                                                        tmp_path, capsys):
    status = main([str(tree), "passes", "fails", "skips", "-j", "2", "--tap", str(tmp_path / "t.tap"),
                   "--junit", str(tmp_path / "j.xml")])
    out = capsys.readouterr().out
    assert status == 1
    assert out.splitlines()[:3] == ["PASS passes", "FAIL fails", "SKIP skips"]     # the cfg's order
    assert "1 passed, 1 failed, 1 skipped" in out
    assert (tmp_path / "t.tap").read_text().splitlines()[1:] == [
        "1..3", "ok 1 - passes", "not ok 2 - fails", "ok 3 - skips # SKIP "]
    suite = ElementTree.parse(tmp_path / "j.xml").getroot()
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("3", "1", "1")
    assert main([str(tree), "-g", "quick"]) == 0                  # passes and skips only: status 0
    assert capsys.readouterr().out.splitlines()[:2] == ["PASS passes", "SKIP skips"]


def test_the_command_refuses_unknown_entries_and_lists_them(tree, capsys):
    assert main([str(tree), "passess"]) == 2
    assert "no such entry" in capsys.readouterr().err
    assert main([str(tree), "--list", "-g", "other"]) == 0
    assert capsys.readouterr().out == "skips\n"


@pytest.mark.parametrize("listing", [[], ["--list"]])
def test_a_group_no_entry_has_is_refused_with_the_cfgs_groups(tree, capsys, listing):
    assert main([str(tree), "-g", "quik", *listing]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""                                  # nothing run, nothing listed
    assert captured.err == ("pykvm unittests: -g quik: no entry of x86/unittests.cfg is in that group (did you mean "
                            "quick?); the groups its 'groups =' lines name: nodefault, other, quick\n")
    # control: a group some entry has selects its entries
    assert main([str(tree), "-g", "quick", "--list", *listing]) == 0
    assert capsys.readouterr().out == "passes\nskips\n"


def test_a_group_that_selects_none_of_the_entries_named_is_refused(tree, capsys):
    assert main([str(tree), "fails", "hangs", "-g", "quick"]) == 2
    assert capsys.readouterr().err == ("pykvm unittests: -g quick: none of the entries named (fails, hangs) is in "
                                       "that group; drop -g to run them, or name entries of the group (--list -g "
                                       "quick lists them)\n")
    # control: one of them is in it, and runs alone (the group narrows the entries named)
    assert main([str(tree), "fails", "skips", "-g", "quick", "--list"]) == 0
    assert capsys.readouterr().out == "skips\n"


def test_a_cfg_without_entries_is_not_a_run_of_none(stand_in_kut_tree, capsys):
    assert main([str(stand_in_kut_tree("# only a comment\n")), "--list"]) == 2
    assert "x86/unittests.cfg has no [NAME] entries to run" in capsys.readouterr().err


@pytest.mark.parametrize("order", ["--qemu first", "--qemu before a TEST"])
def test_a_qemu_binary_that_is_a_folder_or_no_program_is_refused_saying_how_it_was_taken(tree, capsys, order):
    # `--qemu KUT_DIR TEST` takes KUT_DIR as QEMU and TEST as the tree; `KUT_DIR --qemu TEST` takes TEST as QEMU
    argv, taken, what = ((["--qemu", str(tree), "passes"], str(tree), "a folder") if order == "--qemu first" else
                         ([str(tree), "--qemu", "passes"], "passes", "no executable file (nor a command on PATH)"))
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    assert (f"error: --qemu {taken}: taken as QEMU's binary, and it is {what}; put --qemu after KUT_DIR and the "
            f"TESTs (or before another option), or name a binary as --qemu=BINARY") in capsys.readouterr().err


def test_a_qemu_binary_named_with_equals_may_stand_anywhere_and_is_made_absolute(tree, tmp_path, monkeypatch, capsys):
    binary = tmp_path / "bin" / "qemu"
    binary.parent.mkdir()
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    monkeypatch.chdir(binary.parent)
    for argv in ([str(tree), "--qemu=./qemu", "passes"], [str(tree), "passes", "--qemu", "./qemu"],
                 [str(tree), "passes", "--qemu"]):        # after the TESTs, BINARY or not, --qemu takes no TEST
        assert main([*argv, "--list"]) == 0
        assert capsys.readouterr().out == "passes\n"
    assert _qemu_binary("./qemu") == str(binary)           # x86/run runs in the tree: a relative path would miss
    binary.chmod(0o644)                                    # control: the same file, not executable
    with pytest.raises(SystemExit):
        _qemu_binary("./qemu")


def test_a_built_kernel_the_cfg_lacks_runs_as_x86_run_would(kvm_available, tree, capsys):
    # exitcode.flat has no [exitcode] section; with no command line it exits 0 (a PASS), as `x86/run
    # x86/exitcode.flat` would run it: one vCPU, no arguments.  A name with neither is still refused.
    assert main([str(tree), "exitcode", "passes"]) == 0
    assert capsys.readouterr().out.splitlines()[:2] == ["PASS passes", "PASS exitcode"]
    assert main([str(tree), "exitcodes"]) == 2
    assert "nor a built x86/NAME.flat: 'exitcodes'" in capsys.readouterr().err


def test_parity_names_what_differs():
    same = EntryResult("a", "pykvm", Verdict.PASS, 1, "(2 tests)", output="PASS: x\nPASS: y\n")
    other = EntryResult("a", "qemu", Verdict.FAIL, 3, "(2 tests, 1 unexpected failures)", output="PASS: x\nFAIL: y\n")
    assert Parity(same, same).judgement() == "match"
    assert Parity(same, other).judgement() == "differ: verdict FAIL under QEMU, lines (+1 -1 against QEMU)"
    table = parity_table([Parity(same, same), Parity(same, other)]).splitlines()
    assert table[0].startswith("status: the exit status as run_tests.sh reads it: 1 pass, 3 fail, 77 skip, 127 abort")
    assert table[1].strip().startswith("(pykvm's own: 4 triple fault, 6 internal error")
    assert max(len(line) for line in table[:3]) <= 120                     # the legend fits a terminal
    assert table[2].startswith("P/F/S: how many PASS, FAIL and SKIP lines the test printed")
    assert table[3].split() == ["QEMU", "pykvm"] and table[3].index("QEMU") == table[4].index("verdict")
    assert table[4].split() == ["entry", *["verdict", "status", "P/F/S", "time"] * 2, "judgement"]
    assert table[5].split() == ["a", "PASS", "1", "2/0/0", "0.0s", "PASS", "1", "2/0/0", "0.0s", "match"]
    assert table[6].split()[:9] == ["a", "FAIL", "3", "1/1/0", "0.0s", "PASS", "1", "2/0/0", "0.0s"]
    assert len(table) == 7                                                  # the summary is not the table's
    assert parity_summary([Parity(same, same), Parity(same, other)]) == (
        "pykvm matches QEMU's verdict and PASS/FAIL/SKIP lines on 1 of the 2 entries QEMU ran to a verdict; "
        "differs on a; QEMU 0.0 s, pykvm 0.0 s")
    aborted = EntryResult("a", "qemu", Verdict.FAIL, 134)            # QEMU itself died (SIGABRT): nothing to compare
    timed_out = EntryResult("a", "qemu", Verdict.FAIL, 124, reason="timeout; duration=90s")
    assert not Parity(same, aborted).differs and "ended by signal 6" in Parity(same, aborted).judgement()
    assert not Parity(same, timed_out).differs and "timed out" in Parity(same, timed_out).judgement()
    assert parity_summary([Parity(same, same), Parity(same, aborted), Parity(same, timed_out)]).startswith(
        "pykvm matches QEMU's verdict and PASS/FAIL/SKIP lines on 1 of the 1 entry QEMU ran to a verdict; no verdict "
        "from QEMU on 2 entries (QEMU timed out, aborted or was killed: the row says which); ")
    assert parity_table([Parity(same, aborted)]).splitlines()[-1].split()[1:3] == ["FAIL", "134"]
    stopped = EntryResult("a", "qemu", Verdict.FAIL, 124, reason="KVM internal error. Suberror: 1; then timeout")
    mine = EntryResult("a", "pykvm", Verdict.FAIL, 6, reason="internal error: KVM internal error (suberror 1)")
    assert Parity(mine, stopped).judgement().startswith("match: KVM internal error in both")
    assert tap([other]).splitlines()[2] == "not ok 1 - a: (2 tests, 1 unexpected failures)"
    # svm_npt prints reserved bits it draws with RDRAND: the same lines but for their numbers still match...
    def entry(runner: str, first: str) -> EntryResult:
        return EntryResult("svm_npt", runner, Verdict.PASS, 1, output=f"{first}\nPASS: npt_nx\n")
    qemu = entry("qemu", "PASS: Wanted #NPF on rsvd bits = 0x5630000000000, got exit = 0x400")
    drawn = entry("pykvm", "PASS: Wanted #NPF on rsvd bits = 0x8000000000000000, got exit = 0x400")
    assert Parity(drawn, qemu).judgement() == "match: 1 line differs in their numbers only (values drawn at run time)"
    # ...and a line that differs in a word, or PASS against FAIL, does not (the controls)
    assert Parity(entry("pykvm", "PASS: Wanted #NPF on rsvd bits = 0x80, got exit = 0x400 late"), qemu).differs
    assert Parity(entry("pykvm", "FAIL: Wanted #NPF on rsvd bits = 0x80, got exit = 0x400"), qemu).differs
    assert "\\x1b" in junit([EntryResult("b", "pykvm", Verdict.PASS, 1, output="\x1b[31m")])


# -- a real kvm-unit-tests tree (PYKVM_KUT_DIR) ----------------------------------------------------

@pytest.mark.parametrize("name, summary", [("smptest", "(1 tests)"), ("setjmp", "(10 tests)")])
def test_real_entries_pass_with_their_summary(kut_tree, name, summary):
    entry = next(entry for entry in read_config(kut_tree) if entry.name == name)
    outcome = run_pykvm(entry, kut_tree)
    assert outcome.line() == f"PASS {name} {summary}", outcome.output


def test_a_misspelt_group_of_the_real_cfg_is_refused_and_the_group_listed(kut_tree, capsys):
    assert main([str(kut_tree), "-g", "vmexitt"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "-g vmexitt: no entry of x86/unittests.cfg is in that group (did you mean vmexit" \
        in captured.err
    assert main([str(kut_tree), "-g", "vmexit", "--list"]) == 0                 # control: the real group
    assert capsys.readouterr().out.split() == [entry.name for entry in read_config(kut_tree)
                                               if "vmexit" in entry.groups]


def test_pytest_collects_an_item_per_entry(kut_tree, tmp_path):
    names = [entry.name for entry in read_config(kut_tree)]
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--co",
                           "--kvm-unit-tests", str(kut_tree)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert f"{len(names)} tests collected" in done.stdout, done.stdout + done.stderr


FAKE_QEMU_RUN = """#!/bin/bash
# Stands in for the tree's x86/run: prints what the test would and exits as x86/run does (0 pass, 3 fail).
echo "TESTNAME=$TESTNAME ACCEL=$ACCEL $*" >> "$(dirname "$0")/calls"
case "$*" in
    *exit=1*) [ -f "$(dirname "$0")/qemu-passes" ] && exit 0; echo "exiting with 1"; exit 3 ;;
    *) exit 0 ;;
esac
"""


@pytest.mark.parametrize("qemu_passes, status", [(False, 0), (True, 1)])
def test_with_qemu_only_a_difference_from_qemu_fails_the_run(kvm_available, tree, capsys, qemu_passes, status):
    run = tree / "x86" / "run"
    run.write_text(FAKE_QEMU_RUN)
    run.chmod(0o755)
    if qemu_passes:
        (tree / "x86" / "qemu-passes").touch()
    assert main([str(tree), "passes", "fails", "--qemu", "--qemu-where", "failed"]) == status
    out = capsys.readouterr().out
    calls = (tree / "x86" / "calls").read_text().splitlines()
    assert calls == ["TESTNAME=fails ACCEL=kvm x86/exitcode.flat -smp 2 -append exit=1"]     # the failure only
    summary = [line for line in out.splitlines() if "pykvm matches QEMU's" in line]
    if qemu_passes:        # QEMU does better: pykvm's failure is pykvm's
        assert summary == ["pykvm unittests: pykvm matches QEMU's verdict and PASS/FAIL/SKIP lines on 0 of the "
                           "1 entry QEMU ran to a verdict; differs on fails; QEMU " + summary[0].split("; QEMU ")[1]]
        assert "verdict PASS under QEMU" in out
    else:                  # QEMU fails it too, with the same lines: the host's failure, not pykvm's
        assert len(summary) == 1 and summary[0].startswith(
            "pykvm unittests: pykvm matches QEMU's verdict and PASS/FAIL/SKIP lines on 1 of the 1 entry QEMU ran to "
            "a verdict; QEMU ")
    assert "2 entries of" in out


def test_with_qemu_where_failed_and_no_failure_qemu_runs_nothing_and_says_so(kvm_available, tree, capsys):
    run = tree / "x86" / "run"
    run.write_text(FAKE_QEMU_RUN)
    run.chmod(0o755)
    assert main([str(tree), "passes", "--qemu", "--qemu-where", "failed"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert not (tree / "x86" / "calls").exists() and "P/F/S" not in "".join(out)       # no QEMU run, no table
    assert out[-1] == "pykvm unittests: QEMU ran no entry: --qemu-where failed and none failed under pykvm"
    assert out[-2].endswith("under pykvm, 1 entry of " + str(tree.resolve() / "x86" / "unittests.cfg"))


@pytest.mark.parametrize("script, verdict, reason", [
    # The kernel ran, then QEMU exited 0 without the debug exit (-no-reboot: a triple fault): x86/run says 1.
    ('echo "qemu-system-x86_64 -kernel x86/exitcode.flat"; echo "PASS: one"; echo "FAIL: two"; exit 1',
     Verdict.FAIL, "without the debug exit"),
    # QEMU refused to start (its memory in a small host): only the command's echo, QEMU's word on stderr.
    ('echo "qemu-system-x86_64 -kernel x86/exitcode.flat"; '
     'echo "qemu-system-x86_64: cannot set up guest memory \'pc.ram\': Cannot allocate memory" >&2; exit 1',
     Verdict.SKIP, "Cannot allocate memory"),
    # The same with run_tests.sh's TIMEOUT: x86/run's echo starts with the `timeout` wrapper (ept, ept-mbec:
    # QEMU 7.2 has no vmx-mbec property).
    ('echo "timeout -k 1s --foreground 90s /usr/bin/qemu-system-x86_64 -kernel x86/vmx.flat"; '
     'echo "qemu-system-x86_64: Property \'max-x86_64-cpu.vmx-mbec\' not found" >&2; exit 1',
     Verdict.SKIP, "vmx-mbec' not found"),
])
def test_x86_runs_status_1_is_a_failure_once_the_kernel_ran_and_a_skip_before(tree, script, verdict, reason):
    run = tree / "x86" / "run"
    run.write_text(f"#!/bin/bash\n{script}\n")
    run.chmod(0o755)
    entry = {entry.name: entry for entry in read_config(tree)}["passes"]
    outcome = run_qemu(entry, tree, 30)
    assert outcome.verdict == verdict and reason in outcome.reason, outcome
    judged = Parity(EntryResult("passes", "pykvm", Verdict.FAIL, 4, output="PASS: one\nFAIL: two\n"), outcome)
    assert judged.qemu_decided
    assert judged.matches == (verdict == Verdict.FAIL)      # a triple fault under both: the same failure


def test_qemus_run_times_the_kernels_first_byte_and_ends_at_its_limit(tree, monkeypatch):
    run = tree / "x86" / "run"
    # x86/run echoes QEMU's command at once; the kernel speaks after QEMU's firmware (here 0.3 s)
    run.write_text('#!/bin/bash\necho "timeout -k 1s --foreground 30s /usr/bin/qemu-system-x86_64 -kernel x"\n'
                   'sleep 0.3; echo "PASS: one"; echo "SUMMARY: 1 tests"; exit 0\n')
    run.chmod(0o755)
    entry = {entry.name: entry for entry in read_config(tree)}["passes"]
    outcome = run_qemu(entry, tree, 30)
    assert outcome.verdict == Verdict.PASS and outcome.first_byte is not None
    assert 0.3 <= outcome.first_byte <= outcome.seconds
    assert outcome.after_first_byte == pytest.approx(outcome.seconds - outcome.first_byte)
    # control: only the echo, no kernel output: no first byte
    run.write_text('#!/bin/bash\necho "timeout -k 1s --foreground 30s /usr/bin/qemu-system-x86_64"\nexit 3\n')
    assert run_qemu(entry, tree, 30).first_byte is None
    # a run that outlives its limit (the timeout and QEMU_SLACK) is killed with its whole process group
    monkeypatch.setattr(runner, "QEMU_SLACK", 0.5)
    run.write_text('#!/bin/bash\necho "PASS: early"\nsleep 600 & echo $! > "$(dirname "$0")/sleeper"; wait\n')
    hung = run_qemu(entry, tree, 0.001)
    sleeper = int((tree / "x86" / "sleeper").read_text())
    assert hung.status == 124 and "timeout" in hung.reason and hung.first_byte is not None
    assert 0.5 <= hung.seconds < 5
    with contextlib.suppress(psutil.NoSuchProcess):    # SIGKILLed with its group: gone within moments
        psutil.Process(sleeper).wait(timeout=5)        # raises psutil.TimeoutExpired while it lives on
