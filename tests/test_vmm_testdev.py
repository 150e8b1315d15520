"""Unit tests of pc-testdev's MMIO scratch window and flush-page port (pykvm.vmm.testdev), without KVM.

The flush's mprotect runs on a page of this process's own, standing in for
guest memory; the hardware tests (test_vmm_device_boots.py) show KVM drop its
mapping.
"""

from __future__ import annotations

import mmap

import pytest

from pykvm.core.binding import ffi
from pykvm.core.errors import GuestMemoryError, PyKvmError
from pykvm.runtime import hostmaps
from pykvm.vmm import testdev
from pykvm.vmm.testdev import FlushPage, Scratch

RAM_BASE = 0x200000


class FakeMemory:
    """One page of guest RAM at RAM_BASE, backed by an mmap of this process."""

    def __init__(self) -> None:
        self.page = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)   # as guest RAM
        self.address = ctypes_address(self.page)
        self.asked: list[tuple[int, int]] = []

    def host_pointer(self, gpa: int, size: int):
        self.asked.append((gpa, size))
        if not RAM_BASE <= gpa < RAM_BASE + mmap.PAGESIZE:
            raise GuestMemoryError(f"{gpa:#x} is not RAM")
        return ffi.cast("uint8_t *", self.address + gpa - RAM_BASE)


def ctypes_address(page: mmap.mmap) -> int:
    import ctypes
    return ctypes.addressof(ctypes.c_char.from_buffer(page))


def mapping_of(address: int) -> hostmaps.Mapping:
    return next(m for m in hostmaps.read_maps() if m.start <= address < m.end)


def test_the_mmio_window_is_64_kib_of_bytes_that_read_back():
    ioram = Scratch(testdev.IORAM_SIZE)
    assert ioram.read(0, 8) == 0                                   # zeros at first
    ioram.write(0x1000, 8, 0x1122334455667788)
    ioram.write(0x1003, 1, 0xAA)
    assert (ioram.read(0x1000, 8), ioram.read(0x1002, 2)) == (0x11223344AA667788, 0xAA66)
    ioram.write(0xFFFC, 8, 0x0102030405060708)                     # runs past the end: clipped
    assert ioram.read(0xFFFC, 8) == 0xFFFFFFFF05060708


def test_a_flush_keeps_the_page_contents_and_its_protection():
    memory = FakeMemory()
    memory.page[:4] = b"keep"
    port = FlushPage(lambda: memory)
    port.write(0, 4, RAM_BASE + 0x123)
    assert memory.asked == [(RAM_BASE, mmap.PAGESIZE)] and port.flushed == 1
    assert memory.page[:4] == b"keep"                              # MADV_DONTNEED would have zeroed it
    assert mapping_of(memory.address).perms.startswith("rw-")      # back to read-write, not executable
    memory.page[4:8] = b"more"                                     # still writable


def test_a_flush_outside_ram_or_before_the_vm_exists_does_nothing():
    memory = FakeMemory()
    port = FlushPage(lambda: memory)
    port.write(0, 4, 0xFEE00000)
    assert port.flushed == 0 and memory.asked == [(0xFEE00000, mmap.PAGESIZE)]
    idle = FlushPage(lambda: None)
    idle.write(0, 4, RAM_BASE)
    assert idle.flushed == 0
    assert (port.read(0, 4), port.read(0, 1)) == (0xFFFFFFFF, 0xFF)


def test_a_failed_mprotect_says_why():
    memory = FakeMemory()
    memory.address = 0x1000                                        # not mapped in this process
    with pytest.raises(PyKvmError, match="mprotect.*failed: Cannot allocate memory"):
        FlushPage(lambda: memory).write(0, 4, RAM_BASE)
