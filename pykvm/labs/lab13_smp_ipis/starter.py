"""Lab 13: SMP, INIT/SIPI and IPIs.

Read sheet.md first; fill in the TODOs; check with `python lab.py` in this folder.
"""

from pykvm.irqchip import DeliveryMode  # noqa: F401
from pykvm.irqchip.lapic import DestinationShorthand  # noqa: F401


def send_init(task) -> None:
    """From the BSP (task.bsp), send an INIT IPI to the AP whose APIC ID is task.ap_id."""
    print("send_init:", task)
    # TODO: task.bsp.send_ipi(vector, destination=..., delivery_mode=...): an INIT's vector is unused.
    raise NotImplementedError("TODO in send_init() (sheet.md, step 1)")


def send_startup(task) -> None:
    """From the BSP, send a startup IPI (SIPI) that starts AP task.ap_id at page task.sipi_vector."""
    print("send_startup:", task)
    # TODO: the same call, delivery mode STARTUP; what goes in the vector field?
    raise NotImplementedError("TODO in send_startup() (sheet.md, step 2)")


def send_ipi(task, ipi) -> None:
    """From the BSP, send ipi.vector to the CPUs ipi.cpus, the way ipi.kind says."""
    print("send_ipi:", ipi)
    # TODO: one branch per ipi.kind: "one" (physical: task.apic_ids), "mask" (logical: task.logical_ids),
    #       "all-but-self" (a shorthand), "nmi" (delivery mode NMI).
    raise NotImplementedError("TODO in send_ipi() (sheet.md, step 3)")


if __name__ == "__main__":
    from pykvm.labs.runner import check_here

    check_here(13, __file__)
