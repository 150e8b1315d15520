"""Lab 13 reference solution."""

from pykvm.irqchip import DeliveryMode
from pykvm.irqchip.lapic import DestinationShorthand


def send_init(task) -> None:
    task.bsp.send_ipi(0, destination=task.ap_id, delivery_mode=DeliveryMode.INIT)


def send_startup(task) -> None:
    task.bsp.send_ipi(task.sipi_vector, destination=task.ap_id, delivery_mode=DeliveryMode.STARTUP)


def send_ipi(task, ipi) -> None:
    bsp = task.bsp
    if ipi.kind == "one":
        [cpu] = ipi.cpus
        bsp.send_ipi(ipi.vector, destination=task.apic_ids[cpu])
    elif ipi.kind == "mask":
        mask = 0
        for cpu in ipi.cpus:
            mask |= task.logical_ids[cpu]
        bsp.send_ipi(ipi.vector, destination=mask, logical=True)
    elif ipi.kind == "all-but-self":
        bsp.send_ipi(ipi.vector, shorthand=DestinationShorthand.ALL_EXCLUDING_SELF)
    elif ipi.kind == "nmi":
        [cpu] = ipi.cpus
        bsp.send_ipi(0, destination=task.apic_ids[cpu], delivery_mode=DeliveryMode.NMI)
