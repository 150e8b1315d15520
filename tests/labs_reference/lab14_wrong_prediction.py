"""Lab 14, wrong: the right actions, but every request is predicted to show up as req_event."""


# What the checker must say: [(the 1-based step that fails, a phrase its reason contains), ...]; any one.
EXPECTED_FAILURES = [(3, "'req_event'")]


def evidence(name) -> str:
    return "req_event"
