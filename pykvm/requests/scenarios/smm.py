"""SMI and VM_DEAD: system-management mode, and the VM KVM gives up on."""

from __future__ import annotations

from collections.abc import Callable

from .common import UNREACHABLE, Outcome, request

REQUESTS = (
    request(
        "VM_DEAD",
        "kvm_vm_dead(): an unrecoverable KVM bug or state (e.g. SMI without SMRAM)",
        "KVM_RUN returns EIO",
        "KVM_SMI with no SMRAM slot",
        "EIO from KVM_RUN and every later ioctl",
        "Marks the VM dead: every vCPU leaves with EIO and no ioctl works any more.",
        pvm=UNREACHABLE,
        needs="SMM",
    ),
    request(
        "SMI",
        "KVM_SMI, LAPIC SMI delivery",
        "process_smi()",
        "RAM in address space 1, then KVM_SMI",
        "events smi.pending; the guest's SMM handler at SMBASE+0x8000",
        "Enters system-management mode.",
        pvm=UNREACHABLE,
        needs="SMM",
    ),
)
SCENARIOS: dict[str, Callable[..., Outcome]] = {}
