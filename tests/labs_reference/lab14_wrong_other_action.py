"""Lab 14, wrong: each request gets the host action of the next one in the table's order."""


# What the checker must say: [(the 1-based step that fails, a phrase its reason contains), ...]; any one.
EXPECTED_FAILURES = [(1, 'after trigger() the checker saw')]


def trigger(task) -> None:
    names = list(ACTIONS)
    ACTIONS[names[(names.index(task.name) + 1) % len(names)]](task)
