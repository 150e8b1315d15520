"""Lab 1: solve() spins forever, never touching KVM: the step fails at its deadline, the check goes on."""

LAB = 1
DEADLINE = 1.5                 # the step it spins in fails at its deadline
EXPECTED_FAILURES = [(1, "did not finish within")]


def solve(task):
    while True:
        pass
