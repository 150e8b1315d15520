"""``Irqfd`` and ``Ioeventfd``: eventfds that KVM reads or writes without a vCPU exit.

Why this exists: an irqfd is how a real VMM's device threads interrupt a guest
without touching the vCPU thread: writing the eventfd makes KVM raise the GSI
(and, for a level-triggered line with resample, tells the device through a
second eventfd when the guest has EOId). An ioeventfd is the reverse: a guest
write to a port or MMIO address signals an eventfd inside KVM, with no exit to
userspace. Each object owns its eventfds and unregisters them on close.
"""

from __future__ import annotations

import os
import select
from typing import TYPE_CHECKING, TypeVar

from .binding import ffi
from .constants import IoeventfdFlag, IrqfdFlag
from .errors import ClosedError, InvalidRouting, ioctl_error
from .ioctls import Ioctl

if TYPE_CHECKING:
    from .vm import Vm


R = TypeVar("R", bound="EventfdRegistration")
IOEVENTFD_LENGTHS = (0, 1, 2, 4, 8)   # write sizes KVM_IOEVENTFD matches (0: any, MMIO only)


EVENTFD_LINK = "anon_inode:[eventfd]"     # what /proc/self/fd/N reads for an eventfd


def _check_eventfd(fd: int, what: str) -> None:
    try:
        os.fstat(fd)
    except OSError:
        raise InvalidRouting(f"{what} {fd} is not an open file descriptor (closed eventfd?); pass "
                             f"an open eventfd (os.eventfd(0)) or let pykvm create one") from None
    try:
        kind = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:                 # no /proc: KVM's own check (EINVAL) remains
        return
    if kind != EVENTFD_LINK:
        raise InvalidRouting(f"{what} {fd} is {kind!r}, not an eventfd: KVM can only watch an eventfd; pass "
                             f"one (os.eventfd(0)) or let pykvm create one")


def _new_eventfd(flags: int, purpose: str) -> int:
    """A new eventfd; a typed error (out of file descriptors, say) if the kernel refuses one."""
    try:
        return os.eventfd(0, flags)
    except OSError as exc:
        raise ioctl_error(exc.errno or 0, "eventfd", purpose) from None


def _wait(fd: int, timeout: float | None) -> int:
    """Read an eventfd's counter (0 if nothing arrived within ``timeout`` seconds)."""
    ready, _, _ = select.select([fd], [], [], timeout)
    if not ready:
        return 0
    return int.from_bytes(os.read(fd, 8), "little")


class EventfdRegistration:
    """An eventfd registered with KVM: owned fds, unregistered and closed once, ``with``-able.

    Subclasses say how to (de)register with :meth:`_assign`; the eventfds in
    ``_owned`` are closed with the object, ``_fd`` (the registered one) may belong
    to the caller.
    """

    _DEASSIGN = 0
    _NAME = "eventfd"

    def __init__(self, vm: Vm, fd: int, owned: tuple[int, ...]) -> None:
        self.vm = vm
        self._fd = fd
        self._owned = owned
        try:
            self._assign(0)
        except BaseException:
            self._close_fds()
            raise

    def _assign(self, flags: int) -> None:
        raise NotImplementedError

    @property
    def closed(self) -> bool:
        return self._fd < 0

    @property
    def fd(self) -> int:
        """The registered eventfd (write it, select on it)."""
        if self._fd < 0:
            raise ClosedError(f"this {self._NAME} is closed; create a new one with vm.{self._NAME}()")
        return self._fd

    def _close_fds(self) -> None:
        for fd in self._owned:
            if fd >= 0:
                os.close(fd)
        self._fd, self._owned = -1, ()

    def close(self) -> None:
        """Unregister from KVM (if the VM is still open) and close the eventfds. Safe twice."""
        if self._fd < 0:
            return
        try:
            if not self.vm.closed:
                self._assign(self._DEASSIGN)
        finally:
            self._close_fds()

    def __enter__(self: R) -> R:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Irqfd(EventfdRegistration):
    """``KVM_IRQFD``: writing :meth:`trigger` raises GSI ``gsi`` inside KVM.

    With ``resample=True`` (level-triggered lines, ``KVM_CAP_IRQFD_RESAMPLE``),
    a trigger only asserts the line; when the guest EOIs it, KVM de-asserts the
    line and signals :meth:`wait_resample`, after which the device may trigger again.
    """

    _DEASSIGN = IrqfdFlag.DEASSIGN
    _NAME = "irqfd"

    def __init__(self, vm: Vm, gsi: int, resample: bool = False, eventfd: int | None = None) -> None:
        self.gsi, self.resample = gsi, resample
        if eventfd is not None:
            _check_eventfd(eventfd, "irqfd eventfd")
        fd = _new_eventfd(os.EFD_CLOEXEC, f"the irqfd of GSI {gsi}") if eventfd is None else eventfd
        try:
            self._resample_fd = _new_eventfd(os.EFD_CLOEXEC, f"the resample fd of GSI {gsi}") if resample else -1
        except BaseException:
            if eventfd is None:
                os.close(fd)
            raise
        owned = (self._resample_fd,) + ((fd,) if eventfd is None else ())
        super().__init__(vm, fd, owned)

    def _assign(self, flags: int) -> None:
        if self.resample:
            flags |= IrqfdFlag.RESAMPLE
        arg = ffi.new("struct kvm_irqfd *", {"fd": self._fd, "gsi": self.gsi, "flags": flags,
                                             "resamplefd": max(self._resample_fd, 0)})
        self.vm._ioctl(Ioctl.IRQFD, arg, hint="irqfd needs an in-kernel irqchip and a routed GSI; "
                       "resample needs a level-triggered in-kernel IOAPIC or PIC line")

    def trigger(self) -> None:
        """Signal the eventfd: KVM raises the GSI (from any thread, no vCPU exit needed).

        Example::

            import time
            import pykvm
            from pykvm.irqchip import ioapic
            with pykvm.Kvm() as kvm, kvm.create_vm(irqchip="kernel") as vm:
                vm.create_vcpu()
                with vm.irqfd(17, resample=True) as irqfd:  # level-triggered: KVM holds the line up
                    irqfd.trigger()
                    deadline = time.monotonic() + 2
                    while 17 not in ioapic.read(vm).irr:   # KVM raises it from a work item
                        assert time.monotonic() < deadline
        """
        os.write(self.fd, (1).to_bytes(8, "little"))

    def wait_resample(self, timeout: float | None = 1.0) -> bool:
        """Wait until the guest EOId the level interrupt (resample); False on timeout.

        Example::

            import pykvm
            with pykvm.Kvm() as kvm, kvm.create_vm(irqchip="kernel") as vm:
                vm.create_vcpu()
                with vm.irqfd(18, resample=True) as irqfd:
                    irqfd.trigger()
                    assert not irqfd.wait_resample(timeout=0.05)   # no EOI from the guest: no resample
        """
        if not self.resample:
            raise InvalidRouting("this irqfd was created without resample=True")
        self.fd                     # noqa: B018 (raises ClosedError once closed)
        return _wait(self._resample_fd, timeout) > 0

    def __repr__(self) -> str:
        return f"<Irqfd gsi={self.gsi} resample={self.resample} fd={self._fd}>"


class Ioeventfd(EventfdRegistration):
    """``KVM_IOEVENTFD``: a guest write to ``address`` (port if ``pio``) signals an eventfd in KVM."""

    _DEASSIGN = IoeventfdFlag.DEASSIGN
    _NAME = "ioeventfd"

    def __init__(self, vm: Vm, address: int, length: int = 4, pio: bool = False,
                 datamatch: int | None = None) -> None:
        self.address, self.length, self.pio, self.datamatch = address, length, pio, datamatch
        self._flags = (IoeventfdFlag.PIO if pio else 0) | (IoeventfdFlag.DATAMATCH if datamatch is not None else 0)
        fd = _new_eventfd(os.EFD_CLOEXEC | os.EFD_NONBLOCK, f"the ioeventfd at {address:#x}")
        super().__init__(vm, fd, (fd,))

    def _assign(self, flags: int) -> None:
        arg = ffi.new("struct kvm_ioeventfd *", {
            "datamatch": self.datamatch or 0, "addr": self.address, "len": self.length,
            "fd": self._fd, "flags": self._flags | flags})
        self.vm._ioctl(Ioctl.IOEVENTFD, arg, hint="the address range may overlap another ioeventfd")

    def wait(self, timeout: float | None = 1.0) -> int:
        """How many matching guest writes happened (waits up to ``timeout`` for the first).

        Example::

            import pykvm
            from pykvm import HltExit, IoExit, x86
            with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
                vcpu = vm.create_vcpu()
                code = "mov $6, %al\\nout %al, $0x11\\nmov $7, %al\\nout %al, $0x11\\nhlt"
                with vm.ioeventfd(0x11, length=1, pio=True, datamatch=7) as doorbell:
                    x86.load_code(vcpu, code, mode="real")
                    assert isinstance(vcpu.run(), IoExit)        # 6 does not match: an exit to userspace
                    assert isinstance(vcpu.run(), HltExit)       # 7 matches: KVM signalled the eventfd
                    assert doorbell.wait(timeout=0) == 1
        """
        return _wait(self.fd, timeout)
