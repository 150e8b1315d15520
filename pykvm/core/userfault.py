"""Memory whose pages a callback provides on first touch: Linux userfaultfd, served from a thread.

Why this exists: a guest page that is not yet in host memory is how KVM's
asynchronous page faults start (and how post-copy migration and lazy restore
work). With userfaultfd a missing page of a registered range stops whoever
touches it (the guest through KVM, a kernel worker, a host thread) until the
owner of the userfaultfd places the page with ``UFFDIO_COPY``. This module
wraps the syscall and its ioctls (:class:`Userfaultfd`) and runs one serving
thread per range (:class:`PageProvider`): each fault becomes a call of
``provide(offset)`` whose bytes are copied into the page, so a test decides
what a page holds and when it arrives::

    with PageProvider(address, size, lambda offset: page_bytes) as provider:
        ...                                   # touch the range from any thread
    print(provider.faults)                    # what was touched, when, by a write or a read

``vm.memory.provide_pages(slot, provide)`` does this for a memory slot. The
ioctl numbers are computed from the struct sizes with ``ioctl-opt``; the
unit tests compare them with ``<linux/userfaultfd.h>``. Nothing blocks
forever: a provider that raises or is closed unregisters the range, so any
waiter continues with a zero-filled page, and ``close()`` then raises the
provider's error.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import enum
import errno
import os
import select
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from ioctl_opt import IOC, IOC_READ, IOC_WRITE

from . import checks
from .binding import ffi, lib
from .errors import ClosedError, InvalidArgument, PyKvmError, ioctl_error

PAGE_SIZE = 4096
SYS_USERFAULTFD = 323            # x86-64
UFFD_API = 0xAA
UFFDIO = 0xAA                    # the ioctl type letter
O_CLOEXEC, O_NONBLOCK = os.O_CLOEXEC, os.O_NONBLOCK
UFFD_USER_MODE_ONLY = 1          # userfaultfd() flag: only faults from user mode are reported
UNPRIVILEGED_SYSCTL = "/proc/sys/vm/unprivileged_userfaultfd"

# struct uffdio_api { u64 api; u64 features; u64 ioctls; }
UFFDIO_API_STRUCT = struct.Struct("<QQQ")
# struct uffdio_range { u64 start; u64 len; }
UFFDIO_RANGE = struct.Struct("<QQ")
# struct uffdio_register { struct uffdio_range range; u64 mode; u64 ioctls; }
UFFDIO_REGISTER_STRUCT = struct.Struct("<QQQQ")
# struct uffdio_copy { u64 dst; u64 src; u64 len; u64 mode; s64 copy; }
UFFDIO_COPY_STRUCT = struct.Struct("<QQQQq")
# struct uffd_msg { u8 event; u8 pad; u16 pad; u32 pad; union { struct { u64 flags; u64 address; u32 ptid; } } }
UFFD_MSG = struct.Struct("<B3xI QQ I4x")
UFFD_EVENT_PAGEFAULT = 0x12
UFFD_PAGEFAULT_FLAG_WRITE = 1
UFFD_FEATURE_THREAD_ID = 1 << 8  # the message names the faulting thread
UFFDIO_REGISTER_MODE_MISSING = 1


class UffdIoctl(enum.IntEnum):
    """The userfaultfd ioctls pykvm issues, named as in ``<linux/userfaultfd.h>``."""

    UFFDIO_API = IOC(IOC_READ | IOC_WRITE, UFFDIO, 0x3F, UFFDIO_API_STRUCT.size)
    UFFDIO_REGISTER = IOC(IOC_READ | IOC_WRITE, UFFDIO, 0x00, UFFDIO_REGISTER_STRUCT.size)
    UFFDIO_UNREGISTER = IOC(IOC_READ, UFFDIO, 0x01, UFFDIO_RANGE.size)
    UFFDIO_COPY = IOC(IOC_READ | IOC_WRITE, UFFDIO, 0x03, UFFDIO_COPY_STRUCT.size)

    @property
    def macro(self) -> str:
        return self.name


class UserfaultUnavailable(PyKvmError):
    """The userfaultfd syscall was refused; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class PageFault:
    """One missing page touched in a registered range: its page's host address, write or read, by whom, when."""

    address: int
    write: bool
    thread: int          # the faulting thread's id (threading.get_native_id(); a kernel worker's own)
    time: float          # time.monotonic() when the serving thread read the fault


class Userfaultfd:
    """A userfaultfd (non-blocking, close-on-exec) with the API handshake done; a context manager."""

    def __init__(self, user_mode_only: bool = False) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        flags = O_CLOEXEC | O_NONBLOCK | (UFFD_USER_MODE_ONLY if user_mode_only else 0)
        fd = libc.syscall(SYS_USERFAULTFD, flags)
        if fd < 0:
            raise UserfaultUnavailable(_refusal(ctypes.get_errno(), user_mode_only))
        self._fd = fd
        self._lock = threading.Lock()
        self.user_mode_only = user_mode_only
        try:
            api = bytearray(UFFDIO_API_STRUCT.pack(UFFD_API, UFFD_FEATURE_THREAD_ID, 0))
            self._ioctl(UffdIoctl.UFFDIO_API, api)
            _, self.features, self.ioctls = UFFDIO_API_STRUCT.unpack(api)
        except BaseException:
            self.close()
            raise

    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise ClosedError("this Userfaultfd is closed; create a new one")
        return self._fd

    def _ioctl(self, request: UffdIoctl, arg: bytearray) -> None:
        result = lib.pykvm_ioctl(self.fd, request, ffi.from_buffer(arg))
        if result < 0:
            raise ioctl_error(-result, request.macro, f"Userfaultfd (fd {self._fd})")

    def register(self, address: int, length: int) -> None:
        """``UFFDIO_REGISTER``: report missing pages of ``[address, +length)`` (page-aligned host addresses) to this fd.

        A thread touching such a page then waits until :meth:`copy` fills it (or the range is unregistered).

        Example::

            import ctypes, mmap
            from pykvm.core.errors import KvmError
            from pykvm.core.userfault import Userfaultfd
            area = mmap.mmap(-1, 4096)
            address = ctypes.addressof(ctypes.c_char.from_buffer(area))
            with Userfaultfd(user_mode_only=True) as uffd:
                try:
                    uffd.copy(address, bytes(4096))
                    raise AssertionError("the kernel filled a page of a range nobody registered")
                except KvmError:
                    uffd.register(address, 4096)     # now its missing pages are this fd's to fill
                    uffd.copy(address, bytes(4096))
        """
        _check_range(address, length)
        self._ioctl(UffdIoctl.UFFDIO_REGISTER,
                    bytearray(UFFDIO_REGISTER_STRUCT.pack(address, length, UFFDIO_REGISTER_MODE_MISSING, 0)))

    def unregister(self, address: int, length: int) -> None:
        """``UFFDIO_UNREGISTER``: stop reporting ``[address, +length)``; missing pages fill with zeros, waiters wake.

        Example::

            import ctypes, mmap, threading
            from pykvm.core.userfault import Userfaultfd
            area = mmap.mmap(-1, 4096)
            address = ctypes.addressof(ctypes.c_char.from_buffer(area))
            seen = ctypes.create_string_buffer(b"old", 4)
            with Userfaultfd(user_mode_only=True) as uffd:
                uffd.register(address, 4096)
                reader = threading.Thread(target=ctypes.memmove, args=(seen, address, 4))
                reader.start()                       # faults on the missing page and waits
                assert uffd.read_fault(timeout=2) is not None
                uffd.unregister(address, 4096)       # the waiter wakes, the page fills with zeros
                reader.join(timeout=2)
                assert seen.raw == bytes(4)
        """
        _check_range(address, length)
        self._ioctl(UffdIoctl.UFFDIO_UNREGISTER, bytearray(UFFDIO_RANGE.pack(address, length)))

    def copy(self, address: int, data: bytes) -> None:
        """``UFFDIO_COPY``: place ``data`` (whole pages) at ``address`` and wake whoever waits for it.

        Example::

            import ctypes, mmap
            from pykvm.core.userfault import Userfaultfd
            area = mmap.mmap(-1, 4096)
            address = ctypes.addressof(ctypes.c_char.from_buffer(area))
            with Userfaultfd(user_mode_only=True) as uffd:
                uffd.register(address, 4096)
                uffd.copy(address, b"page".ljust(4096, b"\\0"))    # filled before anyone touches it
                assert area[:4] == b"page" and uffd.read_fault(timeout=0) is None   # so no fault
        """
        raw = checks.data("data", data)
        _check_range(address, len(raw))
        source = ffi.from_buffer(raw)
        self._ioctl(UffdIoctl.UFFDIO_COPY, bytearray(UFFDIO_COPY_STRUCT.pack(
            address, int(ffi.cast("uintptr_t", source)), len(raw), 0, 0)))

    def read_fault(self, timeout: float) -> PageFault | None:
        """The next page fault, or None when none arrives within ``timeout`` seconds.

        Example::

            import ctypes, mmap, threading
            from pykvm.core.userfault import Userfaultfd
            area = mmap.mmap(-1, 4096)
            address = ctypes.addressof(ctypes.c_char.from_buffer(area))
            seen = ctypes.create_string_buffer(4)
            with Userfaultfd(user_mode_only=True) as uffd:
                uffd.register(address, 4096)
                reader = threading.Thread(target=ctypes.memmove, args=(seen, address, 4))
                reader.start()                       # ctypes.memmove releases the GIL while it waits
                fault = uffd.read_fault(timeout=2)
                assert (fault.address, fault.write, fault.thread) == (address, False, reader.native_id)
                uffd.copy(address, b"data".ljust(4096, b"\\0"))
                reader.join(timeout=2)
                assert seen.raw == b"data"
        """
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return None
        try:
            raw = os.read(self.fd, UFFD_MSG.size)
        except BlockingIOError:
            return None
        event, _, flags, address, thread = UFFD_MSG.unpack(raw)
        if event != UFFD_EVENT_PAGEFAULT:
            return None
        return PageFault(address & ~(PAGE_SIZE - 1), bool(flags & UFFD_PAGEFAULT_FLAG_WRITE), thread,
                         time.monotonic())

    def close(self) -> None:
        """Close the fd (idempotent): registered ranges become ordinary memory, waiters wake."""
        with self._lock:
            fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> Userfaultfd:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            self.close()


class PageProvider:
    """Serves missing pages of ``[address, +size)`` from ``provide(offset) -> bytes`` on its own thread.

    ``provide`` gets the page's offset in the range and returns at most one
    page (shorter is zero-padded); it may sleep to model a slow backing store.
    ``faults`` lists every fault served. ``fill(offset, data)`` places a page
    before anyone touches it. ``close()`` (or leaving the ``with`` block) stops
    the thread within ``deadline`` seconds and raises ``provide``'s error, if
    it raised; the range is then ordinary memory.
    """

    def __init__(self, address: int, size: int, provide: Callable[[int], bytes], deadline: float = 10.0,
                 user_mode_only: bool = False) -> None:
        _check_range(address, size)
        if not callable(provide):
            raise InvalidArgument(f"provide={checks.shown(provide)}: expected a callable taking a page offset "
                                  f"and returning the page's bytes")
        self.address, self.size, self._provide, self._deadline = address, size, provide, deadline
        self.faults: list[PageFault] = []
        self.error: BaseException | None = None
        self._uffd = Userfaultfd(user_mode_only)
        self._stop = threading.Event()
        try:
            self._uffd.register(address, size)
        except BaseException:
            self._uffd.close()
            raise
        self._thread = threading.Thread(target=self._serve, name=f"pykvm-pages-{address:#x}", daemon=True)
        self._thread.start()

    def fill(self, offset: int, data: bytes) -> None:
        """``UFFDIO_COPY``: place ``data`` at ``offset`` (page-aligned) now, before it is touched.

        Example::

            import ctypes, mmap
            from pykvm.core.userfault import PageProvider
            area = mmap.mmap(-1, 2 * 4096)
            address = ctypes.addressof(ctypes.c_char.from_buffer(area))
            with PageProvider(address, 2 * 4096, lambda offset: b"late", user_mode_only=True) as provider:
                provider.fill(4096, b"early")                # placed before anyone touches it
                assert (provider.read(0, 4), provider.read(4096, 5)) == (b"late", b"early")
                assert [fault.address - address for fault in provider.faults] == [0]
        """
        checks.integer("offset", offset, 0, self.size - 1, f"a page offset inside the {self.size:#x}-byte range")
        self._uffd.copy(self.address + offset, _page(data))

    def read(self, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset``, waiting (without the GIL) for pages not yet provided.

        Use this (or ``vm.memory.read``, which does the same while a provider exists), not ``ffi.buffer``,
        for a page that may still be missing: a copy holding the GIL, which the serving thread needs,
        would wait forever.

        Example::

            import ctypes, mmap
            from pykvm.core.userfault import PageProvider
            area = mmap.mmap(-1, 4 * 4096)
            address = ctypes.addressof(ctypes.c_char.from_buffer(area))
            with PageProvider(address, 4 * 4096, lambda offset: offset.to_bytes(8, "little"),
                              user_mode_only=True) as provider:
                assert provider.read(2 * 4096, 8) == (2 * 4096).to_bytes(8, "little")   # served on first touch
                assert len(provider.faults) == 1
        """
        checks.integer("offset", offset, 0, self.size - 1, f"an offset inside the {self.size:#x}-byte range")
        checks.integer("size", size, 0, self.size - offset, "a length that stays inside the range")
        out = ctypes.create_string_buffer(size)
        ctypes.memmove(out, self.address + offset, size)     # a foreign call: the GIL is released
        return out.raw

    def _serve(self) -> None:
        try:
            while not self._stop.is_set():
                fault = self._uffd.read_fault(0.05)
                if fault is None:
                    continue
                self.faults.append(fault)
                data = self._provide(fault.address - self.address)
                try:
                    self._uffd.copy(fault.address, _page(data))
                except OSError as exc:   # EEXIST: someone placed the page meanwhile
                    if exc.errno != errno.EEXIST:
                        raise
        except BaseException as exc:  # noqa: BLE001 - reported by close()
            self.error = exc
            self._uffd.close()            # waiters continue with zero pages

    def close(self) -> None:
        """Stop serving, unregister the range, and raise the provider's error if it had one.

        Example::

            import ctypes, mmap
            from pykvm.core.errors import PyKvmError
            from pykvm.core.userfault import PageProvider
            def lost(offset):
                raise OSError("the backing store is gone")
            area = mmap.mmap(-1, 4096)
            provider = PageProvider(ctypes.addressof(ctypes.c_char.from_buffer(area)), 4096, lost, user_mode_only=True)
            assert provider.read(0, 4) == bytes(4)           # the page was zero-filled instead
            try:
                provider.close()
                raise AssertionError("close() hid the provider's error")
            except PyKvmError as error:
                assert "backing store is gone" in str(error)
        """
        self._stop.set()
        self._thread.join(self._deadline)
        self._uffd.close()
        if self._thread.is_alive():
            raise PyKvmError(f"the page provider of {self.address:#x}+{self.size:#x} did not stop within "
                             f"{self._deadline} s: its provide() callback is still running")
        if self.error is not None:
            error, self.error = self.error, None
            raise PyKvmError(f"provide() failed for a page of {self.address:#x}+{self.size:#x}: "
                             f"{error!r}; the page was zero-filled instead") from error

    def __enter__(self) -> PageProvider:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _page(data: bytes) -> bytes:
    raw = checks.data("data", data)
    if len(raw) > PAGE_SIZE:
        raise InvalidArgument(f"data of {len(raw)} bytes: a provided page holds at most {PAGE_SIZE} bytes")
    return raw.ljust(PAGE_SIZE, b"\x00")


def _check_range(address: int, length: int) -> None:
    checks.integer("address", address, 1, (1 << 64) - 1, "a host virtual address")
    checks.integer("length", length, 1, (1 << 64) - 1, "a positive number of bytes")
    if address % PAGE_SIZE or length % PAGE_SIZE:
        raise InvalidArgument(f"address={address:#x}, length={length:#x}: both must be multiples of the "
                              f"{PAGE_SIZE}-byte page size")


def _refusal(err: int, user_mode_only: bool) -> str:
    why = os.strerror(err)
    try:
        with open(UNPRIVILEGED_SYSCTL) as sysctl:
            unprivileged = sysctl.read().strip()
    except OSError:
        unprivileged = "?"
    if err == errno.EPERM and not user_mode_only:
        return (f"userfaultfd refused ({why}): {UNPRIVILEGED_SYSCTL} is {unprivileged}, so faults from the "
                f"kernel (as KVM's) need CAP_SYS_PTRACE; run as root, or set it to 1")
    return f"userfaultfd refused ({why}): this kernel may lack CONFIG_USERFAULTFD"
