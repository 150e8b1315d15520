"""The one base class of every object that owns a KVM file descriptor.

Why this exists: ``Kvm``, ``Vm`` and ``Vcpu`` share the same lifecycle rules
(context manager, idempotent ``close()``, a typed error on use after close) and
the same ioctl error mapping; they are written once, here.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from . import checks
from .binding import ffi, lib
from .constants import Cap
from .errors import ClosedError, InvalidArgument, KvmInvalidArgument, PyKvmError, ioctl_error
from .ioctls import Ioctl


class FdObject:
    """Owns one fd; subclasses add ``_release()`` for extra resources (mmaps, children)."""

    _fd: int

    def __init__(self, fd: int) -> None:
        # The lock first: from the moment _fd is set, __del__ may close (a Ctrl-C can land on
        # any line of a subclass's __init__). Subclasses set what their _release() reads
        # before calling this, for the same reason.
        self._close_lock = threading.Lock()
        self._fd = fd

    # -- identity used in error messages ------------------------------------
    def describe(self) -> str:
        """Short name used in messages, e.g. ``Vcpu 0 of Vm (fd 5)``."""
        return f"{type(self).__name__} (fd {self._fd})"

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._fd}"
        return f"<{self.describe() if not self.closed else type(self).__name__} {state}>"

    # -- lifecycle ----------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._fd < 0

    @property
    def fd(self) -> int:
        """The raw file descriptor (for ioctls pykvm does not wrap)."""
        self._check_open()
        return self._fd

    def _check_open(self) -> None:
        if self._fd < 0:
            raise self._closed()

    def _closed(self) -> ClosedError:
        """The error for a use after close (a subclass may say what closed it)."""
        return ClosedError(f"{type(self).__name__} is closed; create a new one (objects cannot be reopened)")

    def close(self) -> None:
        """Release the fd and everything hanging off it. Safe to call twice."""
        with self._close_lock:
            if self._fd < 0:
                return
            fd, self._fd = self._fd, -1
            try:
                self._release()
            finally:
                os.close(fd)

    def _release(self) -> None:
        """Free resources other than the fd (overridden)."""

    def __enter__(self):
        self._check_open()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            self.close()

    # -- ioctls ---------------------------------------------------------------
    def _ioctl(self, request: Ioctl, arg: Any = ffi.NULL, hint: str = "") -> int:
        """Issue ``request`` with a pointer (or NULL) argument; typed error on failure."""
        self._check_open()
        result = lib.pykvm_ioctl(self._fd, request, arg)
        if result < 0:
            raise ioctl_error(-result, request.macro, self.describe(), hint)
        return result

    def _ioctl_value(self, request: Ioctl, value: int, hint: str = "") -> int:
        """Issue ``request`` with an integer argument; typed error on failure."""
        self._check_open()
        result = lib.pykvm_ioctl_value(self._fd, request, value)
        if result < 0:
            raise ioctl_error(-result, request.macro, self.describe(), hint)
        return result

    def _enable_cap(self, cap: int, args: tuple[int, ...], flags: int, hint: str = "") -> None:
        """``KVM_ENABLE_CAP`` on this fd (a VM's or a vCPU's: the same ioctl and struct on both)."""
        checks.integer("cap", cap, 0, 0x7FFFFFFF, "a KVM_CAP_* number, e.g. pykvm.Cap.SPLIT_IRQCHIP")
        if len(args) > 4:
            raise InvalidArgument(f"args: {len(args)} values, but struct kvm_enable_cap has 4")
        for index, arg in enumerate(args):
            checks.unsigned(f"args[{index}]", arg, 64)
        checks.unsigned("flags", flags, 32)
        try:
            self._ioctl(Ioctl.ENABLE_CAP, ffi.new("struct kvm_enable_cap *",
                                                  {"cap": int(cap), "flags": flags, "args": list(args)}), hint)
        except KvmInvalidArgument as exc:
            raise ioctl_error(exc.errno or 0, "KVM_ENABLE_CAP", self.describe(),
                              self._refused_cap_hint(int(cap), args, flags, hint)) from None

    def _capability_source(self) -> FdObject:
        """The fd whose KVM_CHECK_EXTENSION answers for capabilities enabled on this one (the VM's)."""
        return self

    def _refused_cap_hint(self, cap: int, args: tuple[int, ...], flags: int, hint: str) -> str:
        """Why KVM_ENABLE_CAP said EINVAL: a capability this KVM lacks, or arguments it refused."""
        name = f"KVM_CAP_{Cap(cap).name}" if cap in set(Cap) else "a capability pykvm does not know"
        try:
            offered = self._capability_source()._ioctl_value(Ioctl.CHECK_EXTENSION, cap)
        except PyKvmError:
            offered = -1
        if offered == 0:
            return (f"cap={cap} ({name}): this KVM does not offer it (KVM_CHECK_EXTENSION = 0), so it cannot "
                    f"be enabled; enable only what check_extension() reports")
        return (f"cap={cap} ({name}) is offered, but KVM refused args={args}, flags={flags:#x}: pass the args "
                f"and flags KVM's api.rst (section 7) gives for it; some can only be enabled before the first "
                f"vCPU is created or runs{'; ' + hint if hint else ''}")
