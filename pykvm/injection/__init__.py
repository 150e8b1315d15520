"""The injection layer: the rules of the KVM API for putting an event into a vCPU, kept above the binding.

Why this exists: the core (:class:`~pykvm.core.vcpu.Vcpu`) is a binding, one
method per ioctl: ``vcpu.interrupt(vector)`` is ``KVM_INTERRUPT`` and nothing
more, ``vcpu.events = ...`` is ``KVM_SET_VCPU_EVENTS``. What KVM's API asks of
the caller around those ioctls is policy, and it lives here, in one object a
caller creates and passes on (it is never registered at import):
:class:`Injector` injects an interrupt only when the last exit reported
``ready_for_interrupt_injection`` (and says why not), and runs the exception
sequence (CPU mode, ``KVM_CAP_EXCEPTION_PAYLOAD``, completing the pending exit,
never replacing an event, CR2 without a payload). Layers above
(:class:`pykvm.irqchip.UserspaceIrqController`, the guests' tests, the labs,
the requests scenarios, the demo) are given one.
"""

from .injector import Injector

__all__ = ["Injector"]
