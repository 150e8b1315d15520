"""A small userspace interrupt controller for the userspace-irqchip path.

Why this exists: ``KVM_INTERRUPT`` is only correct when the last exit reported
``ready_for_interrupt_injection``. Real VMMs keep pending vectors and wait for
the interrupt window; this does the same for one vCPU: it holds pending vectors
in priority order, injects the highest through its
:class:`~pykvm.injection.Injector` when KVM says the guest is ready, and
otherwise sets ``request_interrupt_window``. A device thread raises a vector
with :meth:`UserspaceIrqController.raise_irq`, which also kicks the vCPU out of
``KVM_RUN`` (the costly "kick" of the userspace path). It injects on
``KVM_EXIT_IRQ_WINDOW_OPEN`` or on *any* exit that reports ready, because some
hosts (kvm_pvm) never send window exits.
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import TYPE_CHECKING

from ..core.constants import ExitReason, as_enum
from ..core.errors import InvalidArgument
from ..core.interrupts import check_vector
from ..core.state import record
from ..injection import Injector

if TYPE_CHECKING:
    from ..core.vcpu import Vcpu


@record
class Injection:
    """One ``KVM_INTERRUPT`` the controller issued: which vector, after which exit, at which RIP."""

    vector: int
    after_exit: ExitReason | int
    rip: int
    exit_sequence: int = dataclasses.field(default=0, repr=False)


class UserspaceIrqController:
    """Pending vectors for one vCPU, injected through ``KVM_INTERRUPT`` when ready.

    Attach with ``UserspaceIrqController(vcpu)``; ``Vcpu.run()`` then calls
    :meth:`before_entry` before every ``KVM_RUN``. Like an IRR bit, queueing a
    vector that is already pending does not queue it twice. Priority follows
    the APIC rule: the higher vector first. ``injector`` is the vCPU's
    :class:`~pykvm.injection.Injector` when the caller injects through one too
    (so that both see what is queued); by default the controller makes its own.
    """

    def __init__(self, vcpu: Vcpu, injector: Injector | None = None) -> None:
        if vcpu.irq_controller is not None:
            raise InvalidArgument(f"vCPU {vcpu.id} already has an interrupt controller attached")
        if injector is None:
            injector = Injector(vcpu)
        elif not isinstance(injector, Injector) or injector.vcpu is not vcpu:
            raise InvalidArgument(f"UserspaceIrqController(injector={injector!r}): pass a pykvm.injection.Injector "
                                  f"of vCPU {vcpu.id} (Injector(vcpu)), or none")
        self.vcpu = vcpu
        self.injector = injector
        self._pending: list[int] = []        # heap of -vector
        self.injections: list[Injection] = []
        vcpu.irq_controller = self

    @property
    def pending(self) -> list[int]:
        """Pending vectors, highest priority first."""
        return sorted((-v for v in self._pending), reverse=True)

    def queue(self, vector: int) -> None:
        """Make ``vector`` pending; it is injected at the first entry where the guest is ready."""
        check_vector(vector)
        if -vector not in self._pending:
            heapq.heappush(self._pending, -vector)

    def raise_irq(self, vector: int) -> None:
        """From any thread: queue ``vector`` and kick the vCPU so it is injected without waiting for an exit."""
        self.queue(vector)
        self.vcpu.kick()

    def before_entry(self) -> None:
        """Inject the highest pending vector if the last exit reported ready; else ask for the window."""
        run = self.vcpu.kvm_run
        if self._pending and self.injector.can_interrupt:
            vector = -heapq.heappop(self._pending)
            reason = as_enum(ExitReason, run.exit_reason)
            self.injector.interrupt(vector)
            self.injections.append(Injection(vector, reason, self.vcpu.regs.rip, self.vcpu.exit_sequence))
        run.request_interrupt_window = bool(self._pending)

    def detach(self) -> None:
        """Stop managing the vCPU (pending vectors are dropped)."""
        if self.vcpu.irq_controller is self:
            self.vcpu.irq_controller = None
            if not self.vcpu.closed:
                self.vcpu.kvm_run.request_interrupt_window = False
        self._pending.clear()
