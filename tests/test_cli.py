"""How pykvm's commands end: Ctrl-C at any moment of the demo and the bench is a clean exit (130)."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_boot_kernels import interrupted_at_import  # a sitecustomize that sends SIGINT at an import

from pykvm import command, exit_status
from pykvm.core.errors import KvmUnavailableError, PyKvmError
from pykvm.testing import popen_interruptible
from pykvm.vmm import testkernels

# 4 moments per command by default; PYKVM_SIGINT_RUNS=50 for the full loop.
RUNS = int(os.environ.get("PYKVM_SIGINT_RUNS", "4"))


def interrupt_at(argv: list[str], delay: float) -> tuple[int, str]:
    """Start ``argv``, wait for its first line of output (its imports are done), SIGINT it ``delay`` s later."""
    process = popen_interruptible([sys.executable, "-m", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None
    process.stdout.readline()                 # the command is running
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    return process.returncode, err


COMMANDS = {"demo": (["pykvm.demo"], 2.5),
            "bench": (["pykvm.bench", "injection", "--count", "10", "--rounds", "1"], 1.5)}   # 1.0 s quiet


@pytest.mark.host_independent
@pytest.mark.deadline(90)
@pytest.mark.parametrize("run", range(RUNS))
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_sigint_at_a_random_moment_never_kills_by_signal(kvm_available, command, run):
    # Run k is interrupted at a random moment of the k-th slice of the command's first `window` seconds:
    # few runs, and still spread over start-up, the guest's run and the measurement.
    argv, window = COMMANDS[command]
    delay = window * (run + random.Random(run).random()) / RUNS
    status, err = interrupt_at(argv, delay)
    assert status in (0, exit_status.EXIT_INTERRUPTED), (delay, status, err[-3000:])
    assert "Traceback" not in err, err[-3000:]


@pytest.mark.host_independent
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_sigint_right_after_start_is_exit_130(kvm_available, command):
    # The control for the random moments: interrupted before it can finish, the command says so with 130.
    status, err = interrupt_at(COMMANDS[command][0], 0.0)
    assert status == exit_status.EXIT_INTERRUPTED, (status, err[-3000:])
    assert "Traceback" not in err and "interrupted" in err, err[-3000:]


@pytest.mark.parametrize("raised, status, text", [
    (KeyboardInterrupt(), exit_status.EXIT_INTERRUPTED, "interrupted"),
    (KvmUnavailableError(2, "open", "/dev/kvm", "no KVM here"), exit_status.EXIT_NO_KVM, "cannot use KVM"),
    (PyKvmError("broken"), exit_status.EXIT_ERROR, "PyKvmError: broken"),
    (MemoryError(), exit_status.EXIT_ERROR, "out of memory"),
])
def test_run_command_maps_each_ending_to_a_status_and_a_line(capsys, raised, status, text):
    def body() -> int:
        raise raised
    previous = signal.getsignal(signal.SIGINT)
    try:
        assert exit_status.run_command("prog", body) == status
    finally:
        signal.signal(signal.SIGINT, previous)
    assert text in capsys.readouterr().err


def test_run_command_passes_the_bodys_status_through_and_leaves_ctrl_c_alone():
    previous = signal.getsignal(signal.SIGINT)
    assert exit_status.run_command("prog", lambda: 7) == 7
    assert signal.getsignal(signal.SIGINT) is previous     # a caller (pytest) keeps its Ctrl-C


def test_exit_with_ignores_a_late_ctrl_c():
    code = ("import signal, sys\nfrom pykvm import command, exit_status\ntry:\n    exit_status.exit_with(3)\nfinally:\n"
            "    print(signal.getsignal(signal.SIGINT) == signal.SIG_IGN)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 3 and result.stdout.strip() == "True", result


# The `pykvm` console command (pykvm/command.py), run as a user runs it: the script pip put beside this Python.
PYKVM = Path(sys.executable).with_name("pykvm")
TOOLS = ("demo", "doctor", "boot", "unittests", "labs", "requests", "bench", "hosts")


def pykvm_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(PYKVM), *args], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


@pytest.mark.host_independent
def test_pykvm_help_lists_every_tool_with_a_line():
    done = pykvm_command("--help")
    assert done.returncode == 0, done.stderr
    listed = re.findall(r"^  (\w+) +(\S.*)$", done.stdout.split("commands:\n", 1)[1], re.M)
    assert tuple(name for name, _ in listed) == TOOLS
    assert all(len(summary) > 10 for _, summary in listed), listed


def python_m(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def words_without(text: str, prog: str) -> list[str]:
    """``text``'s words with ``prog`` (the program's name as the help shows it) taken out: argparse wraps
    the usage line by the name's length."""
    return text.replace(prog, "PROG").split()


@pytest.mark.host_independent
@pytest.mark.parametrize("tool", TOOLS)
def test_pykvm_tool_help_is_the_tools_own_named_as_the_user_ran_it_in_plain_text(tool):
    done = pykvm_command(tool, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: pykvm {tool} "), done.stdout[:300]
    # The same help as `python -m pykvm.TOOL --help`, which names itself so: the arguments after the tool's
    # name reach it untouched.
    direct = python_m(f"pykvm.{tool}", "--help")
    assert direct.stdout.startswith(f"usage: python -m pykvm.{tool} "), direct.stdout[:300]
    # The tools' docstrings are reST for the site; their --help shows none of its markup.
    assert "``" not in direct.stdout and not re.search(r":\w+:`", direct.stdout), direct.stdout
    assert "pykvm " + tool not in direct.stdout.replace("python -m pykvm." + tool, "")
    assert words_without(done.stdout, f"pykvm {tool}") == words_without(direct.stdout, f"python -m pykvm.{tool}")
    # `python -m pykvm TOOL` is the console command without its script, and says so.
    package = python_m("pykvm", tool, "--help")
    assert package.stdout.startswith(f"usage: python -m pykvm {tool} "), package.stdout[:300]
    assert words_without(package.stdout, f"python -m pykvm {tool}") == words_without(done.stdout, f"pykvm {tool}")


@pytest.mark.host_independent
def test_doctor_help_describes_it_and_its_exit_statuses_in_plain_text():
    done = pykvm_command("doctor", "--help")
    assert done.stdout.split("\n\n")[1] == "what this KVM host is, what it offers, and how it delivers events."
    closing = " ".join(done.stdout.split("\n\n")[-1].split())
    assert closing.startswith("--json prints the same for machines; --markdown prints the table")
    assert closing.endswith("the exit status is 0 unless pykvm itself failed or its cache holds a changed entry "
                            "(1), or /dev/kvm cannot be used (2).")


@pytest.mark.host_independent
@pytest.mark.parametrize("rest, plain", [
    ("``python -m pykvm.x``: ``--json`` for machines", "python -m pykvm.x: --json for machines"),
    (":mod:`pykvm.hosts` and :func:`~pykvm.hosts.detect`", "pykvm.hosts and detect"),
    (":class:`the table <pykvm.hosts.conformance.Verdict>`", "the table"),
    (":py:data:`~pykvm.command.TOOLS`", "TOOLS"),
    ("no markup: a < b", "no markup: a < b"),
])
def test_plain_text_keeps_what_a_role_or_literal_shows(rest, plain):
    assert command.plain_text(rest) == plain


@pytest.mark.host_independent
def test_a_tools_description_drops_its_invocation():
    assert command.description("``python -m pykvm.boot KERNEL``: boot a :mod:`~pykvm.vmm` kernel.\n\nMore.") == \
        "boot a vmm kernel."
    assert command.description("Benchmarks of pykvm.\n") == "Benchmarks of pykvm."
    assert command.description(None) == ""       # python -OO strips docstrings


@pytest.mark.host_independent
@pytest.mark.parametrize("args, words", [
    (["nope"], "unknown command 'nope': choose from demo, doctor, boot, unittests, labs, requests, bench, hosts"),
    ([], "a COMMAND is required"),
    (["--nope"], "unrecognized arguments: --nope"),
])
def test_pykvm_refuses_an_unknown_command_with_status_2(args, words):
    done = pykvm_command(*args)
    assert (done.returncode, done.stdout) == (2, "")
    assert words in done.stderr and done.stderr.startswith("usage: pykvm")


@pytest.mark.host_independent
def test_pykvm_passes_the_tools_exit_status_and_errors_through():
    # A bad option of the tool is the tool's argparse error (status 2), not pykvm's.
    done = pykvm_command("boot", "--smp", "0", "kernel.elf")
    assert done.returncode == 2 and "usage: pykvm boot" in done.stderr
    assert "argument --smp: 0: must be > 0" in done.stderr
    # Control: a run the tool completes has the tool's own status (a kernel that is not a file: 1).
    done = pykvm_command("boot", "/nonexistent/kernel.elf")
    assert done.returncode == 1 and done.stderr.startswith("pykvm boot:"), done.stderr


@pytest.mark.host_independent
def test_ctrl_c_while_pykvm_boot_imports_is_exit_130_as_under_python_m(tmp_path):
    # `pykvm boot` raises the same import guard `python -m pykvm.boot` does (pykvm.startup).
    kernel = str(testkernels.path("exitcode"))
    status, errors = interrupted_at_import(tmp_path, "pykvm.vmm.machine", [str(PYKVM), "boot", kernel, "--append",
                                                                          "hang", "--timeout", "30"])
    assert (status, errors) == (130, "\npykvm boot: interrupted\n")


@pytest.mark.host_independent
def test_the_sites_commands_page_shows_every_tools_help():
    # docs/reference/commands.md generates each tool's --help at build time; a new tool needs its section there.
    page = (Path(__file__).resolve().parent.parent / "docs" / "reference" / "commands.md").read_text()
    assert re.findall(r"^```\{pykvm-help\} (\w+)$", page, re.M) == list(TOOLS)
