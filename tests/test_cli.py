"""How pykvm's commands end: Ctrl-C at any moment of the demo and the bench is a clean exit (130)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from pykvm import cli
from pykvm.core.errors import KvmUnavailableError, PyKvmError

# 6 by default (about 30 s); PYKVM_SIGINT_RUNS=50 for the full loop.
RUNS = int(os.environ.get("PYKVM_SIGINT_RUNS", "6"))


def interrupt_at_random(argv: list[str], seed: int, window: float) -> tuple[int, str]:
    """Start ``argv``, wait for its first line of output, SIGINT it after a random delay."""
    process = subprocess.Popen([sys.executable, "-m", *argv], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    process.stdout.readline()                 # the command is running (imports done)
    time.sleep(random.Random(seed).uniform(0, window))
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    return process.returncode, err


@pytest.mark.deadline(30 + 20 * RUNS)
@pytest.mark.parametrize("argv, window", [(["pykvm.demo"], 2.5),
                                          (["pykvm.bench", "injection", "--count", "40", "--rounds", "1"], 4.0)],
                         ids=["demo", "bench"])
def test_sigint_at_random_moments_never_kills_by_signal(kvm_available, argv, window):
    statuses = []
    for run in range(RUNS):
        status, err = interrupt_at_random(argv, seed=run, window=window)
        statuses.append(status)
        assert status in (0, cli.EXIT_INTERRUPTED), (run, status, err[-3000:])
        assert "Traceback" not in err, err[-3000:]
    assert statuses.count(cli.EXIT_INTERRUPTED) >= 1      # the control: some runs were interrupted


@pytest.mark.parametrize("raised, status, text", [
    (KeyboardInterrupt(), cli.EXIT_INTERRUPTED, "interrupted"),
    (KvmUnavailableError(2, "open", "/dev/kvm", "no KVM here"), cli.EXIT_NO_KVM, "cannot use KVM"),
    (PyKvmError("broken"), cli.EXIT_ERROR, "PyKvmError: broken"),
])
def test_run_command_maps_each_ending_to_a_status_and_a_line(capsys, raised, status, text):
    def body() -> int:
        raise raised
    previous = signal.getsignal(signal.SIGINT)
    try:
        assert cli.run_command("prog", body) == status
    finally:
        signal.signal(signal.SIGINT, previous)
    assert text in capsys.readouterr().err


def test_run_command_passes_the_bodys_status_through_and_leaves_ctrl_c_alone():
    previous = signal.getsignal(signal.SIGINT)
    assert cli.run_command("prog", lambda: 7) == 7
    assert signal.getsignal(signal.SIGINT) is previous     # a caller (pytest) keeps its Ctrl-C


def test_exit_with_ignores_a_late_ctrl_c():
    code = ("import signal, sys\nfrom pykvm import cli\ntry:\n    cli.exit_with(3)\nfinally:\n"
            "    print(signal.getsignal(signal.SIGINT) == signal.SIG_IGN)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 3 and result.stdout.strip() == "True", result
