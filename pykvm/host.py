"""Which KVM this is, and how its interrupt semantics differ from the architecture.

Why this exists: pykvm runs on kvm_pvm (this project's CI host), on kvm_amd and
on kvm_intel, and they do not behave alike (``../shared/hosts.md``). Code and
tests must detect the host, never assume it. Each known difference is a named
:class:`Behaviour` with the reason and whether it was measured here; tests
branch on these to assert the host's documented behaviour.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import os


class VendorModule(str, enum.Enum):
    """The vendor module behind ``/dev/kvm``."""

    INTEL = "kvm_intel"
    AMD = "kvm_amd"
    PVM = "kvm_pvm"
    UNKNOWN = "unknown"


@dataclasses.dataclass(frozen=True)
class Behaviour:
    """One interrupt-semantics fact about a host; ``verified`` is False for expectations."""

    holds: bool
    reason: str
    verified: bool

    def __bool__(self) -> bool:
        return self.holds


_INTEL = "expected from the Intel SDM and KVM's vmx code, unverified here"


@dataclasses.dataclass(frozen=True)
class HostInfo:
    """What pykvm knows about the KVM on this machine."""

    vendor: VendorModule
    sends_irq_window_exits: Behaviour
    io_exit_rip_at_out: Behaviour
    long_mode_interrupt_shadow: Behaviour
    protected_mode_iret: Behaviour
    software_interrupts: Behaviour
    real_mode_ud2: Behaviour
    nmi_delivered_at_iret: Behaviour
    lapic_tracks_in_service: Behaviour
    lapic_delivers_when_unblocked: Behaviour
    single_step_stops_in_sti_shadow: Behaviour

    @property
    def name(self) -> str:
        return self.vendor.value

    def differences(self) -> list[str]:
        """Plain-words list of where this host departs from the architecture / VT-x."""
        from .conformance import EXPECTATIONS
        return [f"{row.title}: {row.explain(known.outcome)} ({known.source})"
                for row in EXPECTATIONS.values() if row.fact is not None
                for known in [row.known(self.vendor)] if known.outcome != row.expected]

    def explain_internal_error(self, exit, mode) -> tuple[str, bool]:
        """Plain words for an ``InternalErrorExit`` in ``mode``; True if a documented host limit."""
        return _explain_internal_error(self, exit, mode)

    def explain_entry_failure(self, reason: int) -> str:
        """Decode ``hardware_entry_failure_reason`` of a FAIL_ENTRY exit for this vendor."""
        if reason & (1 << 63) and reason != 0xFFFFFFFFFFFFFFFF:
            return "KVM refused: this CPU is not supported for running guests"
        if self.vendor == VendorModule.AMD:
            if reason == 0xFFFFFFFFFFFFFFFF:
                return "VMRUN failed (SVM_EXIT_ERR): the VMCB's guest state is invalid"
            return f"SVM exit code {reason:#x}"
        if self.vendor == VendorModule.INTEL:
            basic = reason & 0xFFFF
            text = {33: "invalid guest state", 34: "MSR loading failed",
                    41: "machine-check event"}.get(basic, f"basic exit reason {basic}")
            return f"VM entry failed: {text} (VT-x; {_INTEL})"
        return f"hardware reason {reason:#x} (format specific to {self.name})"


_IRET_OPCODES = (b"\xcf", b"\x66\xcf", b"\x48\xcf")


def _is_software_interrupt(insn: bytes) -> bool:
    return insn[:1] in (b"\xcc", b"\xcd", b"\xce")


def _explain_internal_error(host: "HostInfo", exit, mode) -> tuple[str, bool]:
    """Plain words for an INTERNAL_ERROR, and whether it is a documented limit of this host."""
    from .asm import Mode
    insn = exit.insn_bytes
    where = f"at RIP {exit.rip:#x} in {mode.value} mode (instruction bytes {insn[:4].hex(' ') or 'unknown'})"
    if exit.suberror != 1:
        return f"KVM internal error, suberror {exit.suberror}, {where}", False
    if mode == Mode.PROTECTED and not host.protected_mode_iret and insn.startswith(_IRET_OPCODES):
        return (f"{host.name}'s instruction emulator cannot execute IRET in 32-bit protected mode "
                f"({host.protected_mode_iret.reason}); the interrupt was delivered, the return "
                f"from its handler is what fails. Use real or long mode on this host, or a "
                f"standard vendor module (kvm_intel / kvm_amd) for protected mode; {where}"), True
    if mode != Mode.REAL and not host.software_interrupts and _is_software_interrupt(insn):
        return (f"{host.name} cannot execute INT3 / INT n in {mode.value} mode "
                f"({host.software_interrupts.reason}); guests should report with "
                f"`out`, and software interrupts are testable in real mode here or on "
                f"kvm_intel / kvm_amd; {where}"), True
    if mode == Mode.REAL and not host.real_mode_ud2 and insn.startswith(b"\x0f\x0b"):
        return (f"{host.name} cannot emulate UD2 in real mode ({host.real_mode_ud2.reason}); "
                f"#UD is testable in protected and long mode here; {where}"), True
    return f"KVM could not emulate the instruction {where}", False


def _facts(vendor: VendorModule) -> dict[str, Behaviour]:
    """Each HostInfo fact, derived from its row of the conformance table (pykvm.conformance)."""
    from .conformance import EXPECTATIONS
    facts = {}
    for row in EXPECTATIONS.values():
        if row.fact is not None:
            known = row.known(vendor)
            facts[row.fact] = Behaviour(known.outcome == row.expected, known.source, known.verified)
    return facts


def detect_vendor(sys_module: str = "/sys/module") -> VendorModule:
    """The loaded vendor module, from ``/sys/module/{kvm_intel,kvm_amd,kvm_pvm}``."""
    for vendor in (VendorModule.PVM, VendorModule.AMD, VendorModule.INTEL):
        if os.path.isdir(os.path.join(sys_module, vendor.value)):
            return vendor
    return VendorModule.UNKNOWN


def host_info(vendor: VendorModule) -> HostInfo:
    """The facts pykvm holds for ``vendor``."""
    return HostInfo(vendor, **_facts(vendor))


@functools.lru_cache(maxsize=None)
def detect() -> HostInfo:
    """The facts for this machine's KVM (cached)."""
    return host_info(detect_vendor())
