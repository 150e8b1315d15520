"""Lab 1: SIGSTOP the checker (the parent), then the whole process group and every process it may signal."""

import os
import signal

LAB = 1
DEADLINE = 1.5                 # the step it stops in fails at its deadline
EXPECTED_FAILURES = [(1, "was stopped (SIGSTOP")]


def solve(task):
    os.kill(os.getppid(), signal.SIGSTOP)
    os.kill(0, signal.SIGSTOP)
    os.kill(-1, signal.SIGSTOP)
    os.kill(os.getpid(), signal.SIGSTOP)
