"""Lab 1: reserve 8 GiB (lazily: without a limit, calloc's mapping would succeed untouched)."""

LAB = 1
EXPECTED_FAILURES = [(1, "solve() raised MemoryError")]


def solve(task):
    hoard = bytearray(8 << 30)
    hoard[-1] = 1
