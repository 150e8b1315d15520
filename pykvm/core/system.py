"""``Kvm``: the ``/dev/kvm`` system file descriptor.

Why this exists: it is the root of the object tree (``Kvm`` -> ``Vm`` ->
``Vcpu``), answers what this host supports (API version, capabilities, CPUID,
vCPU mmap size) and turns a missing or forbidden ``/dev/kvm`` into an error
that says how to fix it.
"""

from __future__ import annotations

import errno
import functools
import os
import stat
from typing import TYPE_CHECKING

from . import checks
from .binding import ffi, lib
from .constants import Cap
from .cpuid import CpuidEntry, cpuid_from_c
from .errors import (
    CapabilityMissing,
    KvmError,
    KvmPermissionDenied,
    KvmUnavailableError,
    PyKvmError,
    fd_exhaustion_hint,
)
from .fdobject import FdObject
from .ioctls import Ioctl

if TYPE_CHECKING:
    from .interrupts import IrqchipMode
    from .vm import Vm

# Three pages just below the 4 GiB boundary, out of the guests' way (QEMU uses the same area).
DEFAULT_TSS_ADDR = 0xFFFBD000
DEFAULT_IDENTITY_MAP_ADDR = 0xFFFBC000

DEFAULT_PATH = "/dev/kvm"


class Kvm(FdObject):
    """An open ``/dev/kvm``. ``with Kvm() as kvm: vm = kvm.create_vm()``."""

    def __init__(self, path: str = DEFAULT_PATH) -> None:
        checks.instance("path", path, (str, os.PathLike), "the KVM device node, e.g. '/dev/kvm'")
        self.path = os.fspath(path)
        try:
            _check_device_node(self.path)
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise _unavailable(exc, self.path) from None
        super().__init__(fd)
        try:
            version = self._ioctl_value(Ioctl.GET_API_VERSION, 0)
        except KvmError as exc:
            self.close()
            raise KvmUnavailableError(exc.errno or 0, "KVM_GET_API_VERSION", self.path,
                                      f"path={self.path!r} is a character device but not KVM's: it answers no KVM "
                                      f"ioctl; pass the KVM device node, {DEFAULT_PATH!r}") from None
        if version != lib.KVM_API_VERSION:
            self.close()
            raise PyKvmError(f"{path} speaks KVM API version {version}, pykvm needs "
                             f"{lib.KVM_API_VERSION}: this is not a Linux KVM device")
        self.api_version = version

    def describe(self) -> str:
        return f"Kvm ({self.path}, fd {self._fd})"

    def check_extension(self, cap: Cap | int) -> int:
        """``KVM_CHECK_EXTENSION``: whether this host's KVM offers capability ``cap``.

        KVM answers 0 if absent, else a positive, cap-specific value (a count, a size, a bit mask).

        Example::

            import pykvm
            from pykvm import Cap
            with pykvm.Kvm() as kvm:
                assert kvm.check_extension(Cap.USER_MEMORY) == 1
                assert kvm.check_extension(Cap.MAX_VCPUS) >= kvm.check_extension(Cap.NR_VCPUS) > 0
        """
        return self._ioctl_value(Ioctl.CHECK_EXTENSION, checks.integer(
            "cap", cap, 0, 0x7FFFFFFF, "a KVM_CAP_* number, e.g. pykvm.Cap.IRQCHIP"))

    def require(self, cap: Cap, purpose: str) -> int:
        """``KVM_CHECK_EXTENSION`` as :meth:`check_extension`, raising :class:`CapabilityMissing` if absent.

        Returns KVM's positive, cap-specific value; ``purpose`` names the feature in the message.

        Example::

            import pykvm
            from pykvm import Cap, CapabilityMissing
            with pykvm.Kvm() as kvm:
                assert kvm.require(Cap.USER_MEMORY, "guest memory") == 1
                try:
                    kvm.require(Cap.X86_SMM, "vcpu.smi()")
                except CapabilityMissing as missing:          # this host's KVM has no SMM
                    assert "KVM_CAP_X86_SMM" in str(missing) and not kvm.check_extension(Cap.X86_SMM)
        """
        value = self.check_extension(cap)
        if not value:
            raise CapabilityMissing(
                f"{purpose} needs KVM_CAP_{Cap(cap).name}, which this host's KVM does not offer "
                f"(KVM_CHECK_EXTENSION returned 0); run on a host that has it, or skip this feature")
        return value

    @functools.cached_property
    def vcpu_mmap_size(self) -> int:
        """``KVM_GET_VCPU_MMAP_SIZE``: the size of each vCPU's shared ``kvm_run`` mapping.

        KVM places ``struct kvm_run`` in the first page and, after it, pages such as
        the PIO data page; every vCPU fd is mapped at this length.

        Example::

            import pykvm
            with pykvm.Kvm() as kvm:
                assert kvm.vcpu_mmap_size >= 4096 and kvm.vcpu_mmap_size % 4096 == 0
        """
        return self._ioctl_value(Ioctl.GET_VCPU_MMAP_SIZE, 0)

    @functools.cached_property
    def supported_cpuid(self) -> tuple[CpuidEntry, ...]:
        """``KVM_GET_SUPPORTED_CPUID``: the CPUID leaves KVM can offer a guest.

        The host's CPUID masked to what KVM can virtualize, plus KVM's own leaves (0x40000000).

        Example::

            import pykvm
            with pykvm.Kvm() as kvm:
                leaves = {entry.function for entry in kvm.supported_cpuid}
                assert {0x0, 0x1, 0x80000000, 0x80000001} <= leaves
        """
        entries = lib.KVM_MAX_CPUID_ENTRIES
        while True:
            cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": entries, "entries": entries})
            try:
                self._ioctl(Ioctl.GET_SUPPORTED_CPUID, cpuid)
                return cpuid_from_c(cpuid)
            except OSError as exc:
                if exc.errno != errno.E2BIG:
                    raise
                entries *= 2

    @functools.cached_property
    def mce_cap_supported(self) -> int:
        """``KVM_X86_GET_MCE_CAP_SUPPORTED``: the MCG_CAP bits KVM emulates (bank count aside).

        The bank count KVM allows is ``check_extension(Cap.MCE)``; needs
        ``KVM_CAP_MCE``: :class:`CapabilityMissing` without it.

        Example::

            import pykvm
            from pykvm import Cap
            with pykvm.Kvm() as kvm:
                if kvm.check_extension(Cap.MCE):
                    assert kvm.mce_cap_supported & (1 << 8)      # MCG_CTL_P: KVM emulates MCG_CTL
                    assert kvm.mce_cap_supported & 0xFF == 0     # no bank count: that is KVM_CAP_MCE's
        """
        self.require(Cap.MCE, "kvm.mce_cap_supported")
        value = ffi.new("__u64 *")
        self._ioctl(Ioctl.X86_GET_MCE_CAP_SUPPORTED, value)
        return int(value[0])

    @functools.cached_property
    def supported_hv_cpuid(self) -> tuple[CpuidEntry, ...]:
        """``KVM_GET_SUPPORTED_HV_CPUID``: the Hyper-V CPUID leaves (0x40000000-0x4000000A) KVM emulates.

        Merge them into a vCPU's CPUID (``vcpu.set_cpuid``) to give the guest
        Hyper-V's MSRs (crash, reset, SynIC, synthetic timers). Needs
        ``KVM_CAP_SYS_HYPERV_CPUID``: :class:`CapabilityMissing` without it.

        Example::

            import pykvm
            from pykvm import Cap
            with pykvm.Kvm() as kvm:
                if kvm.check_extension(Cap.SYS_HYPERV_CPUID):
                    leaves = {entry.function for entry in kvm.supported_hv_cpuid}
                    assert 0x40000000 in leaves and 0x40000001 in leaves
        """
        self.require(Cap.SYS_HYPERV_CPUID, "kvm.supported_hv_cpuid")
        cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": lib.KVM_MAX_CPUID_ENTRIES,
                                                "entries": lib.KVM_MAX_CPUID_ENTRIES})
        self._ioctl(Ioctl.GET_SUPPORTED_HV_CPUID, cpuid)
        return cpuid_from_c(cpuid)

    def create_vm(self, memory_size: int | None = None, irqchip: IrqchipMode | str = "none",
                  pit: bool = False, tss_addr: int | None = DEFAULT_TSS_ADDR,
                  identity_map_addr: int | None = DEFAULT_IDENTITY_MAP_ADDR,
                  allow_overcommit: bool = False) -> Vm:
        """``KVM_CREATE_VM`` with guest memory and, if asked, an in-kernel irqchip and PIT.

        ``memory_size`` bytes of RAM at guest-physical 0 (16 MiB by default, 0 for
        none); ``irqchip`` is ``"none"`` (userspace: ``vcpu.interrupt()``),
        ``"kernel"`` (PICs, IOAPIC and LAPICs in KVM) or ``"split"`` (LAPICs in KVM
        only); ``pit`` adds the in-kernel 8254 (needs ``"kernel"``); ``tss_addr``
        and ``identity_map_addr`` place the pages VT-x needs for real mode (``None``:
        leave unset); ``allow_overcommit`` allows more RAM than the host has available.
        See :class:`pykvm.Vm`.

        Example::

            import pykvm
            with pykvm.Kvm() as kvm, kvm.create_vm(memory_size=1 << 20, irqchip="kernel") as vm:
                (slot,) = vm.memory.slots
                assert (slot.guest_phys_addr, slot.size) == (0, 1 << 20)
                assert len(vm.create_vcpu().get_lapic()) == 1024     # the in-kernel LAPIC answers
        """
        from .vm import Vm
        return Vm(self, memory_size=memory_size, irqchip=irqchip, pit=pit, tss_addr=tss_addr,
                  identity_map_addr=identity_map_addr, allow_overcommit=allow_overcommit)


def _check_device_node(path: str) -> None:
    """Raise ENODEV for an existing ``path`` that is no character device (a directory, a file, a FIFO)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return                      # open() says why (ENOENT, EACCES)
    if not stat.S_ISCHR(mode):
        raise OSError(errno.ENODEV, f"{_FILE_KINDS.get(stat.S_IFMT(mode), 'not a device node')}")


_FILE_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFREG: "a regular file", stat.S_IFIFO: "a FIFO",
               stat.S_IFSOCK: "a socket", stat.S_IFBLK: "a block device"}


def _unavailable(exc: OSError, path: str) -> KvmUnavailableError:
    """Map the failure to open ``path`` to an actionable message."""
    if exc.errno == errno.ENODEV:
        hint = (f"path={path!r} is {exc.strerror}, not the KVM character device; pass the KVM device "
                f"node, {DEFAULT_PATH!r}")
    elif exc.errno in (errno.EMFILE, errno.ENFILE):
        hint = fd_exhaustion_hint(exc.errno)
    elif exc.errno == errno.ENOENT and path != DEFAULT_PATH and os.path.exists(DEFAULT_PATH):
        hint = f"{path} does not exist; this machine's KVM device is {DEFAULT_PATH!r}: pass that"
    elif exc.errno == errno.ENOENT:
        hint = (f"{path} does not exist: this machine has no KVM. Load the module "
                f"(`modprobe kvm_intel` or `modprobe kvm_amd`), enable virtualization in the "
                f"firmware, or run on a host (or a VM with nested virtualization) that offers KVM")
    elif exc.errno in (errno.EACCES, errno.EPERM):
        return KvmPermissionDenied(exc.errno, "open", path, permission_hint(path))
    else:
        hint = f"cannot open {path}"
    return KvmUnavailableError(exc.errno or 0, "open", path, hint)


def permission_hint(path: str) -> str:
    """What would let this user open ``path``, from the node's actual mode and owner."""
    try:
        info = os.stat(path)
    except OSError:
        return f"no permission to open {path}"
    mode = stat.S_IMODE(info.st_mode)
    owner, group = _user_name(info.st_uid), _group_name(info.st_gid)
    where = f"{path} is {stat.filemode(info.st_mode)} {owner}:{group}"
    if mode & 0o060 == 0o060:
        return (f"no permission to open {path} ({where}): join its group `{group}` "
                f"(`sudo usermod -aG {group} $USER`, then log in again) or run as root")
    return (f"no permission to open {path} ({where}): no group grants read and write, so joining "
            f"one does not help; run as root, or have root make the node group-accessible "
            f"(`sudo chgrp kvm {path} && sudo chmod 0660 {path}`, or the distribution's udev rule "
            f"for kvm) and join that group")


def _user_name(uid: int) -> str:
    try:
        import pwd
        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        import grp
        return grp.getgrgid(gid).gr_name
    except (ImportError, KeyError):
        return str(gid)
