"""Guest memory: anonymous mappings registered as KVM memory slots.

Why this exists: tests write code and data into the guest and read back what
the guest logged, by guest-physical address. Every access is bounds-checked
against the slots (no raw pointer ever leaves this module), and holds the
memory's lock, which the VM's close takes before it unmaps: an access racing a
close, from any thread, raises :class:`ClosedError` instead of touching
unmapped memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from . import checks
from .binding import ffi, lib
from .constants import Cap, MemoryFlag
from .cpuid import CpuidEntry
from .errors import (
    CapabilityMissing,
    ClosedError,
    GuestMemoryError,
    InvalidArgument,
    MemorySlotOverlap,
    PyKvmError,
    ioctl_error,
)
from .ioctls import Ioctl

if TYPE_CHECKING:
    from .userfault import PageProvider
    from .vm import Vm

PAGE_SIZE = 4096
MAX_GPA = (1 << 52) - 1          # the architectural limit of guest-physical addresses
ADDRESS_SIZES_LEAF = 0x80000008  # CPUID: EAX[7:0] MAXPHYADDR, EAX[23:16] guest-physical size (0: same)
DEFAULT_PHYS_BITS = 36           # MAXPHYADDR where that leaf is absent (Intel SDM Vol. 3A 4.1.4)


def guest_phys_bits(supported_cpuid: Iterable[CpuidEntry]) -> int:
    """The guest-physical address width the vCPUs get: what KVM_GET_SUPPORTED_CPUID's leaf 0x80000008 says.

    A slot above it is unreachable: the guest's page tables cannot name such an
    address (the bits are reserved: #PF), nor can EPT/NPT map it.
    """
    for entry in supported_cpuid:
        if entry.function == ADDRESS_SIZES_LEAF:
            return (entry.eax >> 16 & 0xFF) or (entry.eax & 0xFF) or DEFAULT_PHYS_BITS
    return DEFAULT_PHYS_BITS


def available_memory() -> int:
    """Bytes of host memory available for new allocations (``MemAvailable`` of /proc/meminfo)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62          # unknown: do not refuse


@dataclasses.dataclass(frozen=True)
class MemorySlot:
    """One KVM memory slot: guest-physical ``[guest_phys_addr, end)`` of ``address_space``.

    ``slot`` is KVM's slot field: the address space in bits 16 and up, the slot's id below.
    """

    slot: int
    guest_phys_addr: int
    size: int
    readonly: bool = False
    address_space: int = 0

    @property
    def end(self) -> int:
        return self.guest_phys_addr + self.size

    def __repr__(self) -> str:
        return (f"MemorySlot({self.slot}: {self.guest_phys_addr:#x}-{self.end:#x}"
                f"{', readonly' if self.readonly else ''}"
                f"{f', address space {self.address_space}' if self.address_space else ''})")


class GuestMemory:
    """The VM's guest-physical memory, ``vm.memory``."""

    def __init__(self, vm: Vm) -> None:
        self._vm = vm
        self._slots: list[tuple[MemorySlot, Any]] = []   # (slot, host pointer)
        self._lock = threading.RLock()                   # held by every access and by release
        self._released = False
        self._providers: list[PageProvider] = []         # closed before the memory is unmapped

    @property
    def slots(self) -> tuple[MemorySlot, ...]:
        return tuple(slot for slot, _ in self._slots)

    def add_slot(self, guest_phys_addr: int, size: int, readonly: bool = False,
                 allow_overcommit: bool = False, address_space: int = 0) -> MemorySlot:
        """``KVM_SET_USER_MEMORY_REGION``: back ``[guest_phys_addr, +size)`` with fresh zeroed memory.

        KVM maps the guest-physical range to a new anonymous mapping of this
        process, in the lowest free slot number; guest accesses there need no exit.

        A slot larger than the host's available memory is refused unless
        ``allow_overcommit=True`` (the mapping is lazy, but KVM and the guest can
        touch all of it, and the host then runs out). ``address_space=1`` is x86's
        system-management view (``KVM_CAP_MULTI_ADDRESS_SPACE``): a vCPU in SMM sees
        only the slots of address space 1, e.g. SMRAM at SMBASE; read and write them
        with ``read(..., address_space=1)`` and ``write(..., address_space=1)``.

        Example::

            import pykvm
            from pykvm import HltExit, x86
            with pykvm.Kvm() as kvm, kvm.create_vm(memory_size=1 << 20) as vm:
                slot = vm.memory.add_slot(0x100000, 0x1000)        # one more page, at 1 MiB
                vcpu = vm.create_vcpu()
                x86.load_code(vcpu, "movb $7, (0x100000)\\nhlt", mode="protected")
                assert isinstance(vcpu.run(), HltExit)              # the write went to RAM, no exit
                assert (slot.slot, vm.memory.read_u8(0x100000)) == (1, 7)
        """
        self._vm._check_open()
        if address_space:
            spaces = self._vm.kvm.check_extension(Cap.MULTI_ADDRESS_SPACE)
            checks.integer("address_space", address_space, 0, 0xFFFF, "0, or 1 for x86's SMM view")
            if address_space >= max(spaces, 1):
                raise CapabilityMissing(
                    f"address_space={address_space}: this host's KVM has {max(spaces, 1)} address space(s) "
                    f"(KVM_CAP_MULTI_ADDRESS_SPACE={spaces}); x86 has a second one, for SMM, only where "
                    f"KVM_CAP_X86_SMM is offered; use address_space=0")
        checks.integer("guest_phys_addr", guest_phys_addr, 0, MAX_GPA, "a guest-physical address")
        checks.integer("size", size, 1, MAX_GPA + 1, "a positive number of bytes, a multiple of 4096")
        if size % PAGE_SIZE or guest_phys_addr % PAGE_SIZE:
            raise InvalidArgument(f"memory slot guest_phys_addr={guest_phys_addr:#x}, size={size:#x}: "
                                  f"both must be multiples of the {PAGE_SIZE}-byte page size")
        bits = guest_phys_bits(self._vm.kvm.supported_cpuid)
        if guest_phys_addr + size > 1 << bits:
            raise InvalidArgument(f"memory slot guest_phys_addr={guest_phys_addr:#x}, size={size:#x} ends at "
                                  f"{guest_phys_addr + size:#x}, beyond the {bits}-bit guest-physical address "
                                  f"space this host's vCPUs have (CPUID 0x80000008 MAXPHYADDR): the guest could "
                                  f"never reach it; place the slot below {1 << bits:#x}")
        available = available_memory()
        if size > available and not allow_overcommit:
            raise InvalidArgument(f"size={size:#x} ({size / 2**30:.1f} GiB) is more than this host's "
                                  f"available memory ({available / 2**30:.1f} GiB); use a smaller size, "
                                  f"or pass allow_overcommit=True if the guest will touch little of it")
        for existing, _ in self._slots:
            if existing.address_space != address_space:
                continue
            if guest_phys_addr < existing.end and existing.guest_phys_addr < guest_phys_addr + size:
                raise MemorySlotOverlap(
                    f"memory slot {guest_phys_addr:#x}-{guest_phys_addr + size:#x} overlaps "
                    f"{existing!r}; choose a free guest-physical range (slots: {self.slots})")
        err = ffi.new("int *")
        pointer = lib.pykvm_mmap(-1, size, err)
        if pointer == ffi.NULL:
            raise ioctl_error(err[0], "mmap", f"{size:#x} bytes of guest memory",
                              "not enough memory for this slot")
        used = {existing.slot & 0xFFFF for existing, _ in self._slots if existing.address_space == address_space}
        slot = MemorySlot(address_space << 16 | min(set(range(len(used) + 1)) - used), guest_phys_addr, size,
                          bool(readonly), address_space)
        region = ffi.new("struct kvm_userspace_memory_region *", {
            "slot": slot.slot, "flags": MemoryFlag.READONLY if readonly else 0,
            "guest_phys_addr": guest_phys_addr, "memory_size": size,
            "userspace_addr": int(ffi.cast("uintptr_t", pointer))})
        try:
            self._vm._ioctl(Ioctl.SET_USER_MEMORY_REGION, region)
        except BaseException:
            lib.pykvm_munmap(pointer, size)
            raise
        self._slots.append((slot, pointer))
        return slot

    def _region(self, slot: MemorySlot, pointer: Any, flags: int, size: int) -> Any:
        return ffi.new("struct kvm_userspace_memory_region *", {
            "slot": slot.slot, "flags": flags, "guest_phys_addr": slot.guest_phys_addr,
            "memory_size": size, "userspace_addr": int(ffi.cast("uintptr_t", pointer))})

    def _find(self, slot: int) -> tuple[MemorySlot, Any]:
        for entry in self._slots:
            if entry[0].slot == slot:
                return entry
        raise InvalidArgument(f"slot={slot!r}: no such memory slot (slots: {self.slots})")

    def set_dirty_logging(self, slot: int, enabled: bool) -> None:
        """``KVM_SET_USER_MEMORY_REGION`` with ``KVM_MEM_LOG_DIRTY_PAGES`` on or off for ``slot``.

        Then ``vm.get_dirty_log(slot)`` returns the pages written since the last call.

        Example::

            import errno
            import pykvm
            from pykvm import KvmError
            with pykvm.Kvm() as kvm, kvm.create_vm(memory_size=1 << 20) as vm:
                vm.memory.set_dirty_logging(0, True)
                assert not any(vm.get_dirty_log(0))                  # the guest wrote nothing yet
                vm.memory.set_dirty_logging(0, False)
                try:
                    vm.get_dirty_log(0)
                    raise AssertionError("KVM gave a dirty log for a slot that keeps none")
                except KvmError as refused:
                    assert refused.errno == errno.ENOENT
        """
        self._vm._check_open()
        with self._lock:
            entry, pointer = self._find(slot)
            flags = ((MemoryFlag.READONLY if entry.readonly else 0)
                     | (MemoryFlag.LOG_DIRTY_PAGES if enabled else 0))
            self._vm._ioctl(Ioctl.SET_USER_MEMORY_REGION, self._region(entry, pointer, flags, entry.size))

    def provide_pages(self, slot: int, provide: Callable[[int], bytes], deadline: float = 10.0) -> PageProvider:
        """Serve ``slot``'s pages, on their first touch, from ``provide(gpa)`` (userfaultfd and a thread).

        Pages already written are not affected. KVM waits for a missing page (or,
        with async page faults, lets the guest wait); ``provide`` returns up to a
        page of bytes and may sleep. Read missing pages from the host with the
        provider's ``read()`` or with ``vm.memory.read``: while a provider exists,
        memory copies release the GIL, which the serving thread needs. Close the provider (a context manager) when done;
        closing the VM closes it too. See :mod:`pykvm.core.userfault`.

        Example::

            import pykvm
            from pykvm import HltExit, x86
            with pykvm.Kvm() as kvm, kvm.create_vm(memory_size=1 << 20) as vm:
                slot = vm.memory.add_slot(0x100000, 0x2000)
                with vm.memory.provide_pages(slot.slot, lambda gpa: gpa.to_bytes(4, "little")) as provider:
                    vcpu = vm.create_vcpu()
                    x86.load_code(vcpu, "mov (0x101000), %eax\\nhlt", mode="protected")
                    assert isinstance(vcpu.run(), HltExit)   # KVM waited for the page, then the guest read it
                    assert vcpu.regs.rax == 0x101000
                    assert [fault.address - provider.address for fault in provider.faults] == [0x1000]
        """
        self._vm._check_open()
        with self._lock:
            entry, pointer = self._find(slot)
            checks.function("provide", provide, "provide(gpa) -> bytes (up to a page)")
            checks.seconds("deadline", deadline, "how long close() waits for the serving thread")
            from .userfault import PageProvider  # here: memory never served this way skips the import

            base = entry.guest_phys_addr
            provider = PageProvider(int(ffi.cast("uintptr_t", pointer)), entry.size,
                                    lambda offset: provide(base + offset), deadline)
            self._providers.append(provider)
            return provider

    def remove_slot(self, slot: int) -> None:
        """``KVM_SET_USER_MEMORY_REGION`` with size 0: delete memory slot ``slot``, then unmap its memory.

        KVM invalidates every MMU root that may map it (KVM_REQ_MMU_FREE_OBSOLETE_ROOTS on each vCPU).

        Example::

            import pykvm
            from pykvm import MmioExit, x86
            with pykvm.Kvm() as kvm, kvm.create_vm(memory_size=1 << 20) as vm:
                slot = vm.memory.add_slot(0x100000, 0x1000)
                vm.memory.remove_slot(slot.slot)
                vcpu = vm.create_vcpu()
                x86.load_code(vcpu, "movb $7, (0x100000)\\nhlt", mode="protected")
                exit = vcpu.run()                                    # no memory there any more: MMIO
                assert isinstance(exit, MmioExit) and (exit.phys_addr, exit.is_write) == (0x100000, True)
        """
        self._vm._check_open()
        with self._lock:
            entry, pointer = self._find(slot)
            self._vm._ioctl(Ioctl.SET_USER_MEMORY_REGION, self._region(entry, pointer, 0, 0))
            self._slots.remove((entry, pointer))
            lib.pykvm_munmap(pointer, entry.size)

    def _release(self) -> None:
        with self._lock:
            self._released = True
            providers, self._providers = self._providers, []
            for provider in providers:
                with contextlib.suppress(PyKvmError):   # its error was the caller's to collect
                    provider.close()
            slots, self._slots = self._slots, []
            for slot, pointer in slots:
                lib.pykvm_munmap(pointer, slot.size)

    # -- access -----------------------------------------------------------
    def _locate(self, gpa: int, size: int, address_space: int = 0) -> Any:
        """Host pointer for ``[gpa, gpa+size)``, which must lie inside one slot (call with the lock held)."""
        if self._released:
            raise ClosedError("this VM's memory was released (the VM is closed); create a new VM")
        checks.integer("gpa", gpa, 0, MAX_GPA, "a guest-physical address")
        checks.integer("size", size, 0, MAX_GPA, "a number of bytes")
        for slot, pointer in self._slots:
            if slot.address_space == address_space and slot.guest_phys_addr <= gpa and gpa + size <= slot.end:
                return ffi.cast("uint8_t *", pointer) + (gpa - slot.guest_phys_addr)
        raise GuestMemoryError(
            f"guest-physical {gpa:#x}-{gpa + size:#x} is not inside one memory slot "
            f"(slots: {', '.join(map(repr, self.slots)) or 'none'}); add one with "
            f"vm.memory.add_slot() or create the VM with a larger memory_size")

    def host_pointer(self, gpa: int, size: int) -> Any:
        """A cffi ``uint8_t *`` to ``size`` bytes at ``gpa`` (for C helpers such as the bench injector).

        The pointer is valid only while the VM is open: the caller must not use it past ``close()``.
        """
        with self._lock:
            return self._locate(gpa, size)

    def read(self, gpa: int, size: int, address_space: int = 0) -> bytes:
        """``size`` bytes at guest-physical ``gpa`` (of ``address_space``: 1 is SMRAM's, see ``add_slot``)."""
        with self._lock:
            pointer = self._locate(gpa, size, address_space)
            if not self._providers:
                return ffi.buffer(pointer, size)[:]
            out = ctypes.create_string_buffer(size)
            self._copy_without_gil(ctypes.addressof(out), int(ffi.cast("uintptr_t", pointer)), size)
            return out.raw

    def write(self, gpa: int, data: bytes, address_space: int = 0) -> None:
        """Write ``data`` at guest-physical ``gpa`` (of ``address_space``: 1 is SMRAM's, see ``add_slot``)."""
        raw = checks.data("data", data)
        with self._lock:
            pointer = self._locate(gpa, len(raw), address_space)
            if not self._providers:
                ffi.memmove(pointer, raw, len(raw))
                return
            source = ctypes.create_string_buffer(raw, len(raw))
            self._copy_without_gil(int(ffi.cast("uintptr_t", pointer)), ctypes.addressof(source), len(raw))

    def fill(self, gpa: int, size: int, byte: int = 0) -> None:
        """Set ``size`` bytes at ``gpa`` to ``byte``."""
        checks.integer("size", size, 0, MAX_GPA, "a number of bytes")
        checks.integer("byte", byte, 0, 255)
        self.write(gpa, bytes([byte]) * size)

    @staticmethod
    def _copy_without_gil(destination: int, source: int, size: int) -> None:
        """memmove through ctypes, a foreign call that releases the GIL: a page not yet provided
        (``provide_pages``) faults, and the provider's thread needs the GIL to serve it."""
        ctypes.memmove(destination, source, size)

    def read_int(self, gpa: int, size: int, signed: bool = False) -> int:
        checks.integer("size", size, 1, 8, "an integer's width in bytes")
        return int.from_bytes(self.read(gpa, size), "little", signed=signed)

    def write_int(self, gpa: int, size: int, value: int) -> None:
        checks.integer("size", size, 1, 8, "an integer's width in bytes")
        bits = 8 * size
        checks.integer("value", value, -(1 << (bits - 1)), (1 << bits) - 1,
                       f"a {size}-byte integer, signed or unsigned")
        self.write(gpa, value.to_bytes(size, "little", signed=value < 0))

    def read_u8(self, gpa: int) -> int:
        return self.read_int(gpa, 1)

    def read_u16(self, gpa: int) -> int:
        return self.read_int(gpa, 2)

    def read_u32(self, gpa: int) -> int:
        return self.read_int(gpa, 4)

    def read_u64(self, gpa: int) -> int:
        return self.read_int(gpa, 8)

    def write_u8(self, gpa: int, value: int) -> None:
        self.write_int(gpa, 1, value)

    def write_u16(self, gpa: int, value: int) -> None:
        self.write_int(gpa, 2, value)

    def write_u32(self, gpa: int, value: int) -> None:
        self.write_int(gpa, 4, value)

    def write_u64(self, gpa: int, value: int) -> None:
        self.write_int(gpa, 8, value)

    def __repr__(self) -> str:
        return f"<GuestMemory {', '.join(map(repr, self.slots)) or 'no slots'}>"
