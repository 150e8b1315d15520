"""Lab 13, wrong: sends the SIPI without an INIT first."""


# What the checker must say: [(the 1-based step that fails, a phrase its reason contains), ...]; any one.
EXPECTED_FAILURES = [(1, "no INIT reached it")]


def send_init(task) -> None:
    send_startup(task)
