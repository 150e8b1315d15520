"""``Injector``: interrupts only when the guest is ready, exceptions with the sequence KVM's API asks for.

Why this exists: ``KVM_INTERRUPT`` and ``KVM_SET_VCPU_EVENTS`` do what they are
told, and the KVM API leaves the rest to the caller: inject an external
interrupt only after an exit that reported ``ready_for_interrupt_injection``
(KVM queues one interrupt and a second call silently replaces it), finish the
instruction behind an IO or MMIO exit before setting an event, never replace
an exception KVM still holds. A test that breaks a rule on purpose calls the
core's ioctl itself; everything else goes through one :class:`Injector` per
vCPU, created by the code that owns the vCPU and passed on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..core.constants import Cap, VcpuEventValid
from ..core.errors import CapabilityMissing, ClosedError, InvalidVector, NotReadyForInjection
from ..core.interrupts import (
    DEBUG_VECTOR,
    ERROR_CODE_VECTORS,
    PAGE_FAULT_VECTOR,
    IrqchipMode,
    check_exception,
    check_vector,
)
from ..core.state import ExceptionEvent

if TYPE_CHECKING:
    from ..core.vcpu import Vcpu

_NOTHING_QUEUED = (-1, 0)


class Injector:
    """The injection rules for one vCPU: ``Injector(vcpu)``, then :meth:`interrupt` and :meth:`exception`.

    Example (a long-mode guest, interrupts enabled, one vector injected and seen)::

        from pykvm import guests
        from pykvm.guests import Command
        from pykvm.injection import Injector

        with guests.boot("long") as guest:
            injector = Injector(guest.vcpu)
            assert "ready_for_interrupt_injection=0" in injector.interrupt_refusal()  # IF=0
            guest.command(Command.STI)
            assert injector.interrupt_refusal() is None
            injector.interrupt(0x40)          # KVM_INTERRUPT, the exit said ready
            guest.command(Command.NOP)
            assert [record.vector for record in guest.log()] == [0x40]

    The injector remembers the interrupt it queued until the vCPU's next exit;
    use one injector per vCPU (a :class:`pykvm.irqchip.UserspaceIrqController`
    takes it) so that every caller sees that queue.
    """

    def __init__(self, vcpu: Vcpu) -> None:
        self.vcpu = vcpu
        self._queued = _NOTHING_QUEUED           # (vcpu.exit_sequence, vector) of our last KVM_INTERRUPT

    def __repr__(self) -> str:
        return f"<Injector of vCPU {self.vcpu.id}>"

    # -- external interrupts (userspace irqchip) ------------------------------------
    @property
    def can_interrupt(self) -> bool:
        """Whether :meth:`interrupt` would issue ``KVM_INTERRUPT`` now (:meth:`interrupt_refusal` says why not)."""
        vcpu = self.vcpu
        return self._queued[0] != vcpu.exit_sequence and bool(vcpu.kvm_run.ready_for_interrupt_injection)

    def interrupt_refusal(self, vector: int | None = None) -> str | None:
        """Why :meth:`interrupt` would refuse now (``vector``: the one to be queued), or None if it would not.

        Two reasons, read from the vCPU without an ioctl: an interrupt this
        injector queued is still waiting for the next ``KVM_RUN`` (KVM would
        replace it), or the last exit reported
        ``ready_for_interrupt_injection=0`` (IF=0, an interrupt shadow, or an
        event in flight: KVM would deliver the vector regardless of IF on some
        hosts and fail the VM entry on others).
        """
        vcpu = self.vcpu
        queued_at, queued = self._queued
        if queued_at == vcpu.exit_sequence:
            instead = f" with {vector:#x}" if vector is not None else ""
            return (f"vector {queued:#x} is already queued on vCPU {vcpu.id} for the next entry and KVM "
                    f"would silently replace it{instead}; run the vCPU first, or queue several with "
                    f"pykvm.irqchip.UserspaceIrqController")
        run = vcpu.kvm_run
        if not run.ready_for_interrupt_injection:
            return (f"vCPU {vcpu.id} is not ready for an interrupt (last exit: ready_for_interrupt_injection=0, "
                    f"if_flag={run.if_flag}): the guest has interrupts disabled, is in an interrupt shadow, or "
                    f"an event is pending. Set kvm_run.request_interrupt_window and inject at the next exit "
                    f"that reports ready (pykvm.irqchip.UserspaceIrqController does this); vcpu.interrupt() "
                    f"is the bare KVM_INTERRUPT, for a test that breaks the rule on purpose")
        return None

    def interrupt(self, vector: int) -> None:
        """``KVM_INTERRUPT`` of ``vector``, only if the last exit reported ready and nothing is queued.

        Refused with :class:`~pykvm.core.errors.NotReadyForInjection` saying why
        (:meth:`interrupt_refusal`), before any ioctl. With the in-kernel PIC
        (``irqchip='kernel'``) the ioctl is issued as it is: KVM refuses it, and
        the core's :class:`~pykvm.core.errors.IrqchipModeError` names the paths
        that VM has.
        """
        check_vector(vector)
        vcpu = self.vcpu
        if vcpu.closed:
            raise ClosedError(f"Vcpu {vcpu.id} is closed; create a new one")
        if vcpu.vm.irqchip != IrqchipMode.KERNEL and not self.can_interrupt:
            raise NotReadyForInjection(self.interrupt_refusal(vector))
        vcpu.interrupt(vector)
        self._queued = (vcpu.exit_sequence, vector)

    # -- exceptions ---------------------------------------------------------------
    def exception(self, vector: int, error_code: int | None = None, address: int | None = None,
                  *, pending: bool | None = None) -> None:
        """Make exception ``vector`` (0..31) the vCPU's next event (``KVM_SET_VCPU_EVENTS``).

        ``error_code`` is required for the vectors that push one
        (:data:`pykvm.core.interrupts.ERROR_CODE_VECTORS`: #DF, #TS, #NP, #SS, #GP,
        #PF, #AC, #CP, #VC, #SX) and refused for the others. In real mode
        (CR0.PE=0) no exception pushes an error code (the IVT frame has no slot
        for it; KVM drops ``has_error_code`` there), so ``error_code`` is
        refused and never required. ``address`` is the payload: for #PF (14)
        the faulting address that lands in CR2, for #DB (1) the DR6 bits to
        set. NMIs are not exceptions here: vector 2 is refused (``vcpu.nmi()``).
        Each of these refusals is an :class:`~pykvm.core.errors.InvalidVector`
        naming the argument, raised before anything is changed: the arguments
        are checked before any ioctl, what depends on the CPU mode after a
        ``KVM_GET_SREGS``.

        **Pending or injected.** KVM holds an exception in one of two states. A
        *pending* exception has not been delivered yet: at the next entry KVM
        still decides what it becomes (a nested VM exit when L1 intercepts it,
        #DF when it meets another fault) and applies its payload (CR2 / DR6) at
        delivery, as the CPU does. An *injected* one is already being delivered
        (KVM re-injects it as it is, e.g. after an exit in the middle of
        delivery) and cannot be intercepted any more. Userspace can only set a
        pending exception after enabling ``KVM_CAP_EXCEPTION_PAYLOAD`` on the
        VM. ``pending=None`` (default) does that where the host has the
        capability (``KVM_ENABLE_CAP`` once per VM, which also makes
        ``vcpu.events`` report pending and injected apart for every vCPU of the
        VM) and sets a pending exception with ``KVM_VCPUEVENT_VALID_PAYLOAD``;
        ``pending=True`` requires that (:class:`~pykvm.core.errors.CapabilityMissing`
        otherwise). Without the capability, or with ``pending=False``, the
        exception is set as injected and a #PF's ``address`` is written into
        CR2 with ``KVM_SET_SREGS`` before the run (a #DB payload then needs DR6
        written through ``KVM_SET_DEBUGREGS``, which pykvm does not wrap: refused).

        **After an IO or MMIO exit.** KVM finishes the exiting instruction only
        at the next ``KVM_RUN``, so an exception set before that would meet a
        half-done instruction. This first calls
        :meth:`pykvm.core.vcpu.Vcpu.complete_pending_exit` (``KVM_RUN`` with
        ``immediate_exit=1``: the instruction completes, the guest does not
        run); answer an IN or MMIO read before. The handler then sees RIP after
        that instruction.

        Refused with :class:`~pykvm.core.errors.NotReadyForInjection` when an
        exception is already pending or injected (``KVM_SET_VCPU_EVENTS`` would
        silently replace it). KVM delivers a pending fault as the CPU does, with
        RFLAGS.RF set in the pushed image; an injected one is pushed as it is.
        On kvm_intel only bits 15:0 of an error code reach the guest (KVM's vmx
        code drops the rest rather than fail the VM entry; not measured here).
        """
        check_exception(vector, error_code, address)
        if pending is not None and not isinstance(pending, bool):
            raise TypeError(f"exception(pending={pending!r}): pass True, False or None")
        vcpu = self.vcpu
        if vcpu.closed:
            raise ClosedError(f"Vcpu {vcpu.id} is closed; create a new one")
        kvm = vcpu.vm.kvm
        kvm.require(Cap.VCPU_EVENTS, "Injector.exception()")
        if pending:
            kvm.require(Cap.EXCEPTION_PAYLOAD, "Injector.exception(pending=True)")
        self._check_mode(vector, error_code)
        use_payload = pending if pending is not None else bool(kvm.check_extension(Cap.EXCEPTION_PAYLOAD))
        if vector == DEBUG_VECTOR and address is not None and not use_payload:
            message = (f"exception(1, address={address:#x}): a #DB payload (DR6 bits) needs "
                       f"KVM_CAP_EXCEPTION_PAYLOAD; without it set DR6 with KVM_SET_DEBUGREGS and "
                       f"inject without address")
            raise InvalidVector(message) if pending is False else CapabilityMissing(message)
        vcpu.complete_pending_exit()
        self._set_exception(vector, error_code, address, use_payload)

    def _check_mode(self, vector: int, error_code: int | None) -> None:
        """Refuse an error code in real mode, and a missing one in protected and long mode (``KVM_GET_SREGS``)."""
        vcpu = self.vcpu
        real_mode = not vcpu.sregs.cr0 & 1
        if real_mode and error_code is not None:
            raise InvalidVector(f"exception({vector}, error_code={error_code:#x}): vCPU {vcpu.id} is in real "
                                f"mode (CR0.PE=0), where exceptions push no error code and KVM drops it; "
                                f"drop error_code")
        if not real_mode and vector in ERROR_CODE_VECTORS and error_code is None:
            raise InvalidVector(f"exception({vector}): vector {vector} pushes an error code in protected and "
                                f"long mode; pass error_code= (e.g. 0)")

    def _set_exception(self, vector: int, error_code: int | None, address: int | None, use_payload: bool) -> None:
        """Read the events, refuse to replace an exception, write the new one (and CR2 without a payload)."""
        vcpu = self.vcpu
        events = vcpu.events
        current = events.exception
        if current.injected or current.pending:
            raise NotReadyForInjection(
                f"vCPU {vcpu.id} already has exception {current.nr} "
                f"{'pending' if current.pending else 'injected'}; KVM_SET_VCPU_EVENTS would replace "
                f"it. Run the vCPU first so that it is delivered")
        events.exception = ExceptionEvent(injected=int(not use_payload), nr=vector,
                                          has_error_code=int(error_code is not None),
                                          pending=int(use_payload), error_code=error_code or 0)
        # The other fields go back as KVM_GET_VCPU_EVENTS reported them (KVM always takes the
        # injected interrupt and NMI fields); flags select nothing else (NMI pending, SIPI,
        # shadow, SMM and triple fault stay as they are).
        events.flags = 0
        events.exception_has_payload, events.exception_payload = 0, 0
        if use_payload:
            if Cap.EXCEPTION_PAYLOAD not in vcpu.vm.enabled_caps:
                vcpu.vm.enable_cap(Cap.EXCEPTION_PAYLOAD, 1)
            events.flags = VcpuEventValid.PAYLOAD
            events.exception_has_payload = int(address is not None)
            events.exception_payload = address or 0
        elif vector == PAGE_FAULT_VECTOR and address is not None:
            sregs = vcpu.sregs
            sregs.cr2 = address
            vcpu.sregs = sregs
        vcpu.events = events
