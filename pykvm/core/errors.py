"""Typed exceptions of pykvm.

Why this exists: a failed ioctl is only useful to a test author when it says
which ioctl failed, on which object, and what to do about it. Every ioctl error
becomes a subclass of :class:`KvmError` (itself an :class:`OSError`, so
``errno`` is kept); misuse detected before any ioctl is issued raises a
:class:`PyKvmError` subclass that names the problem and the fix.
"""

from __future__ import annotations

import errno as _errno


class PyKvmError(Exception):
    """Base of every error pykvm raises on its own (not from an ioctl)."""


class KvmError(PyKvmError, OSError):
    """An ioctl on a KVM file descriptor failed.

    ``ioctl`` is the ioctl's name, ``target`` describes the object (``Vcpu 0 of
    Vm fd 5``), ``errno`` the error number, ``hint`` what usually fixes it.
    """

    def __init__(self, err: int, ioctl: str, target: str, hint: str = "") -> None:
        message = f"{ioctl} on {target} failed: {_errno.errorcode.get(err, err)} ({_strerror(err)})"
        if hint:
            message += f". {hint}"
        OSError.__init__(self, err, message)
        self.ioctl = ioctl
        self.target = target
        self.hint = hint

    def __str__(self) -> str:
        return self.strerror or ""


def _strerror(err: int) -> str:
    import os
    return os.strerror(err)


class KvmInvalidArgument(KvmError):
    """EINVAL: KVM rejected the argument or the object's current state."""


class KvmNotSupported(KvmError):
    """ENOTTY / EOPNOTSUPP / ENOSYS: this KVM does not implement the ioctl."""


class KvmNoDevice(KvmError):
    """ENXIO: the ioctl does not apply in this VM's configuration (e.g. irqchip mode)."""


class KvmExists(KvmError):
    """EEXIST: the object (vCPU id, memory slot, irqchip) already exists."""


class KvmBusy(KvmError):
    """EBUSY / EAGAIN: KVM cannot do it now (e.g. a vector is already queued)."""


class KvmFault(KvmError):
    """EFAULT: KVM could not read or write the memory the ioctl pointed to."""


class KvmNoMemory(KvmError):
    """ENOMEM / ENOSPC / E2BIG: out of memory or a table too large."""


class KvmInterrupted(KvmError):
    """EINTR: a signal interrupted the ioctl."""


class KvmVmDead(KvmError):
    """EIO: KVM gave up on the VM (``kvm_vm_dead()``: an internal failure such as an SMI without SMRAM)
    and refuses every further ioctl on it and its vCPUs; only closing it is left. (A forked child using
    its parent's VM gets EIO too: KVM serves a VM only to the process that created it.)"""


class KvmPermissionError(KvmError, PermissionError):
    """EACCES / EPERM."""


class KvmUnavailableError(KvmError):
    """``/dev/kvm`` is missing or cannot be opened."""


class KvmPermissionDenied(KvmUnavailableError, PermissionError):
    """``/dev/kvm`` exists but this user may not open it (the hint follows its mode and owner)."""


_ERRNO_CLASSES: dict[int, type[KvmError]] = {
    _errno.EINVAL: KvmInvalidArgument,
    _errno.ENOTTY: KvmNotSupported,
    _errno.EOPNOTSUPP: KvmNotSupported,
    _errno.ENOSYS: KvmNotSupported,
    _errno.ENXIO: KvmNoDevice,
    _errno.EEXIST: KvmExists,
    _errno.EBUSY: KvmBusy,
    _errno.EAGAIN: KvmBusy,
    _errno.EFAULT: KvmFault,
    _errno.ENOMEM: KvmNoMemory,
    _errno.ENOSPC: KvmNoMemory,
    _errno.E2BIG: KvmNoMemory,
    _errno.EINTR: KvmInterrupted,
    _errno.EACCES: KvmPermissionError,
    _errno.EPERM: KvmPermissionError,
    _errno.EIO: KvmVmDead,
}


def fd_exhaustion_hint(err: int) -> str:
    """What to do about EMFILE (this process's limit, which it names) or ENFILE (the system's)."""
    if err == _errno.ENFILE:
        return ("the system is out of file descriptors (ENFILE: the kernel's fs.file-max); close VMs you "
                "no longer need, or raise fs.file-max")
    import resource
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return (f"the process is out of file descriptors (its limit, RLIMIT_NOFILE, is {soft}): every Kvm, VM, "
            f"vCPU, stats fd and eventfd holds one; close those you no longer need (`with` blocks do), or "
            f"raise the limit (`ulimit -n`, resource.setrlimit)")


VM_DEAD_HINT = ("the VM is dead (KVM_REQ_VM_DEAD): KVM marked it unusable after an internal failure and "
                "refuses every further ioctl on it and its vCPUs; close it and create a new VM")


def ioctl_error(err: int, ioctl: str, target: str, hint: str = "") -> KvmError:
    """The typed exception for errno ``err`` from ``ioctl`` on ``target``."""
    if err in (_errno.EMFILE, _errno.ENFILE):
        hint = fd_exhaustion_hint(err)
    elif err == _errno.EIO and not hint:
        hint = VM_DEAD_HINT
    return _ERRNO_CLASSES.get(err, KvmError)(err, ioctl, target, hint)


class ClosedError(PyKvmError, ValueError):
    """The object (or a view into it) was used after ``close()``."""


class CapabilityMissing(PyKvmError):
    """The host's KVM lacks a capability the operation needs."""


class NotReadyForInjection(PyKvmError):
    """``KVM_INTERRUPT`` was asked for while the last exit reported the guest not ready."""


class GuestMemoryError(PyKvmError, IndexError):
    """A guest-physical access outside every memory slot."""


class MemorySlotOverlap(PyKvmError, ValueError):
    """A new memory slot overlaps an existing one."""


class InvalidVector(PyKvmError, ValueError):
    """An interrupt vector outside 0..255 (or not allowed for the operation)."""


class StaleExitError(PyKvmError):
    """An exit's reply (IN data, MMIO read data) was given after the vCPU ran again."""


class AssemblerError(PyKvmError):
    """``as`` or ``ld`` rejected a guest source; the message carries their output."""


class GuestError(PyKvmError):
    """A guest image did not behave as its protocol says (unexpected exit, assert port)."""

    def __init__(self, message: str, exit: object = None) -> None:
        super().__init__(message)
        self.exit = exit


class HostLimitation(GuestError):
    """The guest hit a documented limit of this host's KVM (e.g. kvm_pvm's emulator).

    ``explanation`` is the plain-words account printed by the demo.
    """


class IrqchipModeError(PyKvmError):
    """An operation that makes no sense with the VM's irqchip mode (none / kernel / split)."""


class InvalidRouting(PyKvmError, ValueError):
    """A GSI routing entry, GSI number or irqfd setup that KVM would reject."""


class InvalidMsi(PyKvmError, ValueError):
    """An MSI address/data pair with reserved bits set or fields out of range."""


class VcpuThreadError(PyKvmError):
    """A vCPU thread died with an exception, or did not stop within its time limit."""


class GuestCancelled(GuestError):
    """A guest session was cancelled (kicked out of KVM_RUN) while it waited for the guest."""


class RunTimeout(GuestCancelled):
    """The vCPU did not reach the awaited exit in time; it was kicked out of KVM_RUN (the message says what it
    was waiting for)."""


class CommandTimeout(RunTimeout):
    """A guest command did not reach its sync point in time; the vCPU was kicked out of KVM_RUN."""


class InvalidArgument(PyKvmError, ValueError):
    """An argument with the right type but a value pykvm or KVM cannot take (the message names it)."""


class UnknownLabel(InvalidArgument, KeyError):
    """A label (symbol) that an assembled guest does not define; the message lists the ones it does."""

    def __str__(self) -> str:          # KeyError would show the message in quotes
        return str(self.args[0]) if self.args else ""


class ArgumentTypeError(PyKvmError, TypeError):
    """An argument of the wrong type (the message names it and the type expected)."""


class VcpuBusyError(PyKvmError, RuntimeError):
    """``run()`` was called on a vCPU that another thread is running."""
