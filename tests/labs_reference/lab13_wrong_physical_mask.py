"""Lab 13, wrong: sends the logical mask in physical destination mode."""

import lab13
from lab13 import send_init, send_startup  # noqa: F401

# What the checker must say: [(the 1-based step that fails, a phrase its reason contains), ...]; any one.
EXPECTED_FAILURES = [(4, "took nothing")]


def send_ipi(task, ipi) -> None:
    if ipi.kind != "mask":
        lab13.send_ipi(task, ipi)
        return
    mask = 0
    for cpu in ipi.cpus:
        mask |= task.logical_ids[cpu]
    task.bsp.send_ipi(ipi.vector, destination=mask)
