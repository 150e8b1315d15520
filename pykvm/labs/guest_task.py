"""The packaged long-mode guest, booted for a lab's scenario: what labs 4 and later hand the student.

Why this exists: from lab 4 on the student drives pykvm's own guest image (it
logs every vector it takes) through :class:`pykvm.guests.GuestSession`; the
checker boots it, hands it over, and reads the log afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ..core.system import Kvm
from ..guests import GuestSession, boot_cpus
from ..hosts import explain_exit


@contextlib.contextmanager
def booted(mode: str = "long", notify: bool = False, irqchip: str = "none") -> Iterator[GuestSession]:
    """A fresh Kvm, VM and vCPU with the ``mode`` image booted to its first sync point; all closed after."""
    with booted_cpus(1, mode, notify, irqchip) as [session]:
        yield session


@contextlib.contextmanager
def booted_cpus(cpus: int, mode: str = "long", notify: bool = False,
                irqchip: str = "kernel") -> Iterator[list[GuestSession]]:
    """Like :func:`booted` with ``cpus`` vCPUs on one VM (an in-kernel irqchip by default): one session each."""
    with Kvm() as kvm, kvm.create_vm(irqchip=irqchip) as vm:
        yield boot_cpus(vm, mode, cpus, notify=notify, explain=explain_exit)


def handler_range(guest: GuestSession) -> range:
    """The image's common handler code, from its entry to its IRET (inclusive)."""
    return range(guest.address("handler_common"), guest.address("handler_iret") + 1)
