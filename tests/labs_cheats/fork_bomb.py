"""Lab 1: a fork bomb, every process forking forever: the check's task cap (pids cgroup, RLIMIT_NPROC) stops it."""

import os

LAB = 1
DEADLINE = 1.5                 # the step it runs in fails at its deadline
EXPECTED_FAILURES = [(1, "did not finish within")]


def solve(task):
    while True:
        try:
            os.fork()
        except OSError:        # the cap: EAGAIN; the bomb goes on trying
            pass
