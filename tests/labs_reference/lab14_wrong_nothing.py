"""Lab 14, wrong: trigger() does nothing."""


# What the checker must say: [(the 1-based step that fails, a phrase its reason contains), ...]; any one.
EXPECTED_FAILURES = [(1, 'nothing moved')]


def trigger(task) -> None:
    return None
