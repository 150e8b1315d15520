"""CPUID entries as records, to and from ``struct kvm_cpuid2``.

Why this exists: both ``Kvm.supported_cpuid`` and ``Vcpu.set_cpuid`` speak
``kvm_cpuid2``; the conversion and the record type are shared here.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

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
    for c_entry, entry in zip(cpuid.entries, entries):
        for name in _FIELDS:
            setattr(c_entry, name, getattr(entry, name))
    return cpuid
