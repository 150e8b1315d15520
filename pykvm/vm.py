"""``Vm``: one KVM virtual machine (the fd returned by ``KVM_CREATE_VM``).

Why this exists: it owns the guest memory and the vCPUs, sets the x86 bits
some vendor modules need before the first run (TSS and identity-map pages for
real mode on VT-x), and closes everything it owns when it is closed.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Iterable

from .binding import ffi
from .cpuid import CpuidEntry
from .fdobject import FdObject
from .ioctls import Ioctl
from .memory import GuestMemory

if TYPE_CHECKING:
    from .kvm import Kvm
    from .vcpu import Vcpu

DEFAULT_MEMORY_SIZE = 16 << 20
# Three pages just below the 4 GiB boundary, out of the guests' way (QEMU uses the same area).
DEFAULT_TSS_ADDR = 0xFFFBD000
DEFAULT_IDENTITY_MAP_ADDR = 0xFFFBC000


class Vm(FdObject):
    """A VM. Made by :meth:`pykvm.Kvm.create_vm`; ``memory_size`` bytes at GPA 0 by default."""

    def __init__(self, kvm: "Kvm", memory_size: int | None = None,
                 tss_addr: int | None = DEFAULT_TSS_ADDR,
                 identity_map_addr: int | None = DEFAULT_IDENTITY_MAP_ADDR) -> None:
        result = kvm._ioctl_value(Ioctl.CREATE_VM, 0,
                                  hint="the host may be out of memory or limit the number of VMs")
        super().__init__(result)
        self.kvm = kvm
        self.vcpus: list["Vcpu"] = []
        self.memory = GuestMemory(self)
        try:
            if identity_map_addr is not None:
                self.set_identity_map_addr(identity_map_addr)
            if tss_addr is not None:
                self.set_tss_addr(tss_addr)
            size = DEFAULT_MEMORY_SIZE if memory_size is None else memory_size
            if size:
                self.memory.add_slot(0, size)
        except BaseException:
            self.close()
            raise

    def describe(self) -> str:
        return f"Vm (fd {self._fd})"

    def set_tss_addr(self, addr: int) -> None:
        """``KVM_SET_TSS_ADDR``: 3 pages VT-x uses to run real mode without unrestricted guest."""
        self._ioctl_value(Ioctl.SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        """``KVM_SET_IDENTITY_MAP_ADDR``: 1 page VT-x uses for the EPT identity map."""
        self._ioctl(Ioctl.SET_IDENTITY_MAP_ADDR, ffi.new("__u64 *", addr))

    def create_vcpu(self, vcpu_id: int | None = None, cpuid: bool = True) -> "Vcpu":
        """``KVM_CREATE_VCPU``; ``vcpu_id`` defaults to the next free one.

        With ``cpuid=True`` the vCPU gets every CPUID leaf KVM supports (needed
        for long mode: KVM refuses EFER.LME when the guest's CPUID lacks LM).
        """
        from .vcpu import Vcpu
        if vcpu_id is None:
            vcpu_id = len(self.vcpus)
        vcpu = Vcpu(self, vcpu_id)
        self.vcpus.append(vcpu)
        if cpuid:
            try:
                vcpu.set_cpuid(cpuid_for_vcpu(self.kvm.supported_cpuid, vcpu_id))
            except BaseException:
                vcpu.close()
                raise
        return vcpu

    def _release(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        self.memory._release()



def cpuid_for_vcpu(entries: Iterable[CpuidEntry], vcpu_id: int) -> list[CpuidEntry]:
    """KVM's supported CPUID with this vCPU's APIC ID in leaves 1 (EBX[31:24]) and 0xB/0x1F (EDX).

    KVM reports the host CPU's values there; a VMM must put the vCPU's own.
    """
    adjusted = []
    for entry in entries:
        if entry.function == 1:
            entry = dataclasses.replace(entry, ebx=(entry.ebx & 0x00FFFFFF) | ((vcpu_id & 0xFF) << 24))
        elif entry.function in (0xB, 0x1F):
            entry = dataclasses.replace(entry, edx=vcpu_id)
        adjusted.append(entry)
    return adjusted
