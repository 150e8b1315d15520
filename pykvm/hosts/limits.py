"""Plain words for the exits that mean "this host could not": entry failures and internal errors.

Why this exists: a ``KVM_EXIT_INTERNAL_ERROR`` on kvm_pvm is often a documented
limit of its instruction emulator (an IRET in 32-bit protected mode, INT n in
long mode), not a guest bug, and a ``KVM_EXIT_FAIL_ENTRY`` carries a
vendor-specific code. The core decodes what KVM reported; this module, which
knows the hosts, adds the explanation: :func:`explain_exit` is the
:data:`~pykvm.core.exits.ExitExplainer` the tools hand to what reports exits
(``pykvm.guests.boot(..., explain=explain_exit)``, the VMM), and a
:class:`~pykvm.core.exits.InternalErrorExit` it recognises gets
``host_limit=True``, which guest sessions turn into
:class:`~pykvm.core.errors.HostLimitation`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..core.constants import InternalErrorKind
from ..core.exits import Exit, FailEntryExit, InternalErrorExit
from ..x86.asm import Mode
from ..x86.modes import cpu_mode, linear_rip
from .facts import HostInfo, detect
from .vendor import VendorModule

if TYPE_CHECKING:
    from ..core.vcpu import Vcpu

_IRET_OPCODES = (b"\xcf", b"\x66\xcf", b"\x48\xcf")
_SOFTWARE_INTERRUPT_OPCODES = (b"\xcc", b"\xcd", b"\xce")
_UD2 = b"\x0f\x0b"
VMX_ENTRY_FAILURE = 1 << 31       # set in the exit reason of a failed VM entry
VMX_INVALID_GUEST_STATE = 33
# kvm_intel reports the VM-instruction error (Intel SDM Vol. 3C 31.4) when VMLAUNCH/VMRESUME itself fails.
VMX_INSTRUCTION_ERRORS = {
    7: ("VM entry with invalid control fields. One cause pykvm users meet: an exception injected with "
        "KVM_SET_VCPU_EVENTS whose has_error_code does not match its vector (the SDM's checks on the "
        "VM-entry interruption-information field: only #DF, #TS, #NP, #SS, #GP, #PF and #AC deliver "
        "an error code, and they must)"),
    8: "VM entry with invalid host-state fields",
}


def explain_entry_failure(host: HostInfo, reason: int) -> str:
    """Decode ``hardware_entry_failure_reason`` of a FAIL_ENTRY exit for this vendor."""
    if reason & (1 << 63) and reason != 0xFFFFFFFFFFFFFFFF:
        return "KVM refused: this CPU is not supported for running guests"
    if host.vendor == VendorModule.AMD:
        if reason == 0xFFFFFFFFFFFFFFFF:
            return "VMRUN failed (SVM_EXIT_ERR): the VMCB's guest state is invalid"
        return f"SVM exit code {reason:#x}"
    if host.vendor == VendorModule.INTEL:
        if not reason & VMX_ENTRY_FAILURE and reason in VMX_INSTRUCTION_ERRORS:
            return f"VMLAUNCH/VMRESUME failed (VM-instruction error {reason}): {VMX_INSTRUCTION_ERRORS[reason]}"
        basic = reason & 0xFFFF
        if basic == VMX_INVALID_GUEST_STATE:
            return (f"VM entry failed ({reason:#x}): invalid guest state. An external interrupt "
                    f"injected while the guest had RFLAGS.IF=0 (a bare vcpu.interrupt() while not ready) "
                    f"fails this VM-entry check (Intel SDM Vol. 3C, 'Checks on Guest RFLAGS'): "
                    f"inject only when the last exit reported ready_for_interrupt_injection=1")
        text = {34: "MSR loading failed", 41: "machine-check event"}.get(basic,
                                                                         f"basic exit reason {basic}")
        return f"VM entry failed ({reason:#x}): {text}"
    return f"hardware reason {reason:#x} (format specific to {host.name})"


def explain_internal_error(host: HostInfo, exit: InternalErrorExit, mode: Mode) -> tuple[str, bool]:
    """Plain words for an INTERNAL_ERROR in ``mode``, and whether it is a documented limit of this host."""
    insn = exit.insn_bytes
    where = (f"at RIP {exit.rip:#x} in {mode.value} mode (instruction bytes "
             f"{insn[:4].hex(' ') or 'unknown'})")
    if exit.suberror != InternalErrorKind.EMULATION:
        return f"KVM internal error, suberror {exit.suberror}, {where}", False
    if mode == Mode.PROTECTED and not host.protected_mode_iret and insn.startswith(_IRET_OPCODES):
        return (f"{host.name}'s instruction emulator cannot execute IRET in 32-bit protected mode "
                f"({host.protected_mode_iret.reason}); the interrupt was delivered, the return "
                f"from its handler is what fails. Use real or long mode on this host, or a "
                f"standard vendor module (kvm_intel / kvm_amd) for protected mode; {where}"), True
    if mode != Mode.REAL and not host.software_interrupts and insn[:1] in _SOFTWARE_INTERRUPT_OPCODES:
        return (f"{host.name} cannot execute INT3 / INT n in {mode.value} mode "
                f"({host.software_interrupts.reason}); guests should report with "
                f"`out`, and software interrupts are testable in real mode here or on "
                f"kvm_intel / kvm_amd; {where}"), True
    if mode == Mode.REAL and not host.real_mode_ud2 and insn.startswith(_UD2):
        return (f"{host.name} cannot emulate UD2 in real mode ({host.real_mode_ud2.reason}); "
                f"#UD is testable in protected and long mode here; {where}"), True
    return f"KVM could not emulate the instruction {where}", False


def explain_exit(vcpu: Vcpu, exit: Exit) -> None:
    """An :data:`~pykvm.core.exits.ExitExplainer`: fills in ``explanation`` (and ``host_limit``) for this host.

    For an internal error it also reads what ``kvm_run`` does not hold: ``rip``
    (``KVM_GET_REGS``) and, when KVM reported none, the instruction bytes there.
    """
    host = detect()
    if isinstance(exit, FailEntryExit):
        exit.explanation = explain_entry_failure(host, exit.hardware_entry_failure_reason)
    elif isinstance(exit, InternalErrorExit):
        sregs = vcpu.sregs
        exit.rip = vcpu.regs.rip          # not in kvm_run: the core's decoder leaves it 0
        if not exit.insn_bytes:
            try:
                exit.insn_bytes = vcpu.vm.memory.read(linear_rip(sregs, exit.rip), 15)
            except IndexError:
                pass
        exit.explanation, exit.host_limit = explain_internal_error(host, exit, cpu_mode(sregs))
