"""Lab 13, wrong: sends the logical mask in physical destination mode."""

# What the checker must say: [(the 1-based step that fails, a phrase its reason contains), ...]; any one.
EXPECTED_FAILURES = [(4, "took nothing")]

reference_send_ipi = send_ipi                 # the reference's, before this file replaces it


def send_ipi(task, ipi) -> None:
    if ipi.kind != "mask":
        reference_send_ipi(task, ipi)
        return
    mask = 0
    for cpu in ipi.cpus:
        mask |= task.logical_ids[cpu]
    task.bsp.send_ipi(ipi.vector, destination=mask)
