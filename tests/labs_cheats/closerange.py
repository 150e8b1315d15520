"""Lab 1: close every fd (the checker's report channel too) and go on running."""

import os
import time

LAB = 1
DEADLINE = 60                  # seen closed within a second of silence, long before this deadline
EXPECTED_FAILURES = [(1, "closed the checker's report channel")]


def solve(task):
    os.closerange(3, 4096)
    time.sleep(3600)
