"""The runtime layer: vCPU threads with bounded stops, and deadlines for calls that wait on a guest.

Why this exists: with an in-kernel irqchip a vCPU blocks inside ``KVM_RUN``, so
SMP tests need a thread per vCPU (:mod:`~pykvm.runtime.threads`), and a call
waiting for an interrupt that never comes must end (:mod:`~pykvm.runtime.watchdog`).
"""

from .threads import VcpuThread, command_in_thread, run_vcpus
from .watchdog import WATCHDOG, Watchdog

__all__ = ["VcpuThread", "command_in_thread", "run_vcpus", "WATCHDOG", "Watchdog"]
