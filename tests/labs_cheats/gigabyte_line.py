"""Lab 1: print 1 GiB on one line, then fail."""

import sys

LAB = 1
EXPECTED_FAILURES = [(1, "RuntimeError: after 1 GiB")]


def solve(task):
    chunk = "A" * (1 << 20)
    for _ in range(1024):
        sys.stdout.write(chunk)
    sys.stdout.flush()
    raise RuntimeError("after 1 GiB")
