"""Test devices as in QEMU's pc-testdev: IRQ lines, an echo port, a flush-page port and an MMIO scratch window.

Why this exists: kvm-unit-tests' x86 tests (run by QEMU with ``-device
pc-testdev``) need to raise an interrupt on a chosen GSI at a chosen moment,
to see port IO round-trip, to make KVM forget its mapping of a page, and to
access memory that KVM must emulate instead of mapping. The pieces:

* ``0x2000 + n`` (:class:`IrqLines`): a byte written drives GSI n (0-23) high
  (non-zero) or low (zero) through ``KVM_IRQ_LINE``, so one ``out`` makes an
  edge or holds a level line; reading gives the level last driven.
* ``0xe0`` (4 bytes, a :class:`Scratch`): returns what was last written there,
  at any width; ``emulator``'s string-IO tests use it.
* ``0xe4`` (:class:`FlushPage`): a write of a guest-physical address makes KVM
  drop its mappings of that page (its contents stay); ``eventinj`` flushes its
  stack and IDT pages so that delivering an event faults inside KVM.
* ``0xff000000``, 64 KiB (a :class:`Scratch` on the MMIO bus): memory no
  memory slot backs, so every access exits to this device, which stores and
  returns bytes; ``emulator`` and ``lam`` map pages of it to test instructions
  KVM emulates on MMIO (reads give what was written, zeros at first).

Not modelled: the other ports of QEMU's device that no kvm-unit-tests x86
test uses.
"""

from __future__ import annotations

import ctypes
import enum
import functools
import mmap
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..core.binding import ffi
from ..core.errors import GuestMemoryError, PyKvmError

if TYPE_CHECKING:
    from ..core.memory import GuestMemory

IRQ_BASE = 0x2000
IRQ_LINES = 24
ECHO_PORT = 0xE0
ECHO_PORTS = 4
FLUSH_PORT = 0xE4
FLUSH_PORTS = 4
IORAM_BASE = 0xFF000000
IORAM_SIZE = 0x10000
PAGE_SIZE = 4096


class Protection(enum.IntFlag):
    """``PROT_*`` of ``mprotect(2)``."""

    READ = mmap.PROT_READ
    WRITE = mmap.PROT_WRITE
    EXEC = mmap.PROT_EXEC


class IrqLines:
    """``set_line(gsi, level)`` for each byte write to ``IRQ_BASE + gsi``."""

    def __init__(self, set_line: Callable[[int, int], object]) -> None:
        self._set_line = set_line
        self.levels = [0] * IRQ_LINES

    def read(self, offset: int, size: int) -> int:
        return self.levels[offset]

    def write(self, offset: int, size: int, value: int) -> None:
        level = int(bool(value & 0xFF))
        self.levels[offset] = level
        self._set_line(offset, level)


class Scratch:
    """``size`` bytes of storage: reads return what was written (little-endian, at the offset).

    Bytes past the end read as 0xff and are not stored.
    """

    def __init__(self, size: int) -> None:
        self.value = bytearray(size)

    def read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.value[offset:offset + size].ljust(size, b"\xff"), "little")

    def write(self, offset: int, size: int, value: int) -> None:
        data = value.to_bytes(size, "little")[:len(self.value) - offset]
        self.value[offset:offset + len(data)] = data


class FlushPage:
    """A write of a guest-physical address drops KVM's mappings of its page; reads give all ones.

    ``memory()`` returns the VM's :class:`~pykvm.core.memory.GuestMemory`, or
    None before the VM exists. The page's host memory is ``mprotect``-ed to
    read-write-execute and back to read-write: each change of protection runs
    the MMU notifiers registered on this process, and KVM's unmaps the page
    from its page tables, so the guest's next access to it faults into KVM,
    which maps it again. Guest memory is private anonymous memory, so
    ``madvise(MADV_DONTNEED)`` would zero the page, and deleting the memory
    slot would unmap all of it; the protection stays readable and writable
    throughout, so no other vCPU's access to the page can fail meanwhile. An
    address outside RAM has no mapping to drop and is ignored.
    """

    def __init__(self, memory: Callable[[], GuestMemory | None]) -> None:
        self._memory = memory
        self.flushed = 0            # pages flushed, for tests and traces

    def read(self, offset: int, size: int) -> int:
        return (1 << 8 * size) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        memory = self._memory()
        if memory is None:
            return
        try:
            pointer = memory.host_pointer(value & ~(PAGE_SIZE - 1), PAGE_SIZE)
        except GuestMemoryError:
            return
        host = int(ffi.cast("uintptr_t", pointer))
        _mprotect(host, Protection.READ | Protection.WRITE | Protection.EXEC)
        _mprotect(host, Protection.READ | Protection.WRITE)
        self.flushed += 1


@functools.cache
def _libc() -> ctypes.CDLL:
    import ctypes.util  # here: its find_library imports subprocess and tempfile

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc


def _mprotect(address: int, protection: Protection) -> None:
    if _libc().mprotect(ctypes.c_void_p(address), ctypes.c_size_t(PAGE_SIZE), int(protection)) != 0:
        error = ctypes.get_errno()
        raise PyKvmError(f"mprotect({address:#x}, {PAGE_SIZE}, {protection!r}) on guest memory failed: "
                         f"{os.strerror(error)}; the flush-page port needs guest memory this process may "
                         f"make executable (a security policy forbidding it must allow this process)")
