"""Lab 1: escape codes that erase the line and paint a fake [PASS] checklist."""

LAB = 1
EXPECTED_FAILURES = [(1, "\\x1b[2K")]

FAKE = "\x1b[2K\r\x1b[1A\x1b[2K  [PASS] 1. solve() creates a VM with one memory slot and a vCPU"


def solve(task):
    print(FAKE * 4)
    raise RuntimeError(FAKE)
