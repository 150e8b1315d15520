"""Lab 1: allocate 20 GiB and touch every page: the address-space limit refuses it before the host's memory goes."""

LAB = 1
EXPECTED_FAILURES = [(1, "solve() raised MemoryError")]


def solve(task):
    hoard = bytearray(20 << 30)
    for page in range(0, len(hoard), 4096):
        hoard[page] = 1
