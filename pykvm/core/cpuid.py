"""CPUID entries as records, to and from ``struct kvm_cpuid2``.

Why this exists: both ``Kvm.supported_cpuid`` and ``Vcpu.set_cpuid`` speak
``kvm_cpuid2``; the conversion and the record type are shared here, with the
per-vCPU adjustments a VMM must make to what KVM reports.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from .binding import ffi


@dataclasses.dataclass(frozen=True)
class CpuidEntry:
    """One CPUID leaf (``function``/``index``) and its four result registers."""

    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int

    def __repr__(self) -> str:
        return (f"CpuidEntry({self.function:#x}.{self.index}: eax={self.eax:#010x} "
                f"ebx={self.ebx:#010x} ecx={self.ecx:#010x} edx={self.edx:#010x})")


_FIELDS = [f.name for f in dataclasses.fields(CpuidEntry)]


def cpuid_from_c(cpuid) -> tuple[CpuidEntry, ...]:
    """Records from a filled ``struct kvm_cpuid2 *``."""
    return tuple(CpuidEntry(*(getattr(e, name) for name in _FIELDS))
                 for e in cpuid.entries[0:cpuid.nent])


def cpuid_to_c(entries: Iterable[CpuidEntry]):
    """A new ``struct kvm_cpuid2 *`` holding ``entries``."""
    entries = list(entries)
    cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": len(entries), "entries": len(entries)})
    for c_entry, entry in zip(cpuid.entries, entries, strict=True):
        for name in _FIELDS:
            setattr(c_entry, name, getattr(entry, name))
    return cpuid


CPUID1_ECX_TSC_DEADLINE = 1 << 24


def cpuid_for_vcpu(entries: Iterable[CpuidEntry], vcpu_id: int, tsc_deadline: bool = False
                   ) -> list[CpuidEntry]:
    """KVM's supported CPUID with this vCPU's APIC ID in leaves 1 (EBX[31:24]) and 0xB/0x1F (EDX).

    KVM reports the host CPU's values there; a VMM must put the vCPU's own. With
    ``tsc_deadline`` (``KVM_CAP_TSC_DEADLINE_TIMER``) leaf 1 offers the TSC-deadline
    timer, which api.rst says userspace must add itself: some hosts (kvm_amd)
    leave it out of KVM_GET_SUPPORTED_CPUID although the LAPIC emulates it.
    """
    adjusted = []
    for entry in entries:
        if entry.function == 1:
            entry = dataclasses.replace(entry, ebx=(entry.ebx & 0x00FFFFFF) | ((vcpu_id & 0xFF) << 24),
                                        ecx=entry.ecx | (CPUID1_ECX_TSC_DEADLINE if tsc_deadline else 0))
        elif entry.function in (0xB, 0x1F):
            entry = dataclasses.replace(entry, edx=vcpu_id)
        adjusted.append(entry)
    return adjusted
