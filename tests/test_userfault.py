"""userfaultfd-backed memory (pykvm.core.userfault): without KVM on a plain mapping, then under a guest.

The unit tests map anonymous memory, let a provider serve it and read it from
another thread; the ioctl numbers are compared with the C header's macros. The
hardware test lets a guest read a slot whose page arrives late.
"""

from __future__ import annotations

import subprocess
import threading
import time

import pytest

from pykvm import x86
from pykvm.core.binding import ffi, lib
from pykvm.core.errors import ArgumentTypeError, InvalidArgument, PyKvmError
from pykvm.core.exits import IoExit
from pykvm.core.userfault import PAGE_SIZE, PageProvider, UffdIoctl, Userfaultfd, UserfaultUnavailable

HEADER_PROGRAM = r"""
#include <stdio.h>
#include <sys/ioctl.h>
#include <linux/userfaultfd.h>
int main(void) {
    printf("%lu %lu %lu %lu\n", (unsigned long)UFFDIO_API, (unsigned long)UFFDIO_REGISTER,
           (unsigned long)UFFDIO_UNREGISTER, (unsigned long)UFFDIO_COPY);
    return 0;
}
"""


@pytest.fixture
def mapping():
    err = ffi.new("int *")
    pointer = lib.pykvm_mmap(-1, 4 * PAGE_SIZE, err)
    assert pointer != ffi.NULL, err[0]
    yield int(ffi.cast("uintptr_t", pointer))
    lib.pykvm_munmap(pointer, 4 * PAGE_SIZE)


def _provider(address, provide):
    try:
        return PageProvider(address, 4 * PAGE_SIZE, provide)
    except UserfaultUnavailable as exc:
        pytest.skip(str(exc))


def test_ioctl_numbers_match_the_header(tmp_path):
    source = tmp_path / "uffd.c"
    source.write_text(HEADER_PROGRAM)
    try:
        subprocess.run(["cc", "-o", str(tmp_path / "uffd"), str(source)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"no C compiler with <linux/userfaultfd.h>: {exc}")
    numbers = subprocess.run([str(tmp_path / "uffd")], capture_output=True, text=True, check=True).stdout.split()
    assert [int(n) for n in numbers] == [int(UffdIoctl[name]) for name in
                                         ("UFFDIO_API", "UFFDIO_REGISTER", "UFFDIO_UNREGISTER", "UFFDIO_COPY")]


def test_a_thread_reading_a_missing_page_waits_for_the_provider(mapping):
    calls = []

    def provide(offset):
        calls.append(offset)
        time.sleep(0.2)
        return bytes([offset // PAGE_SIZE + 1]) * 16

    with _provider(mapping, provide) as provider:
        provider.fill(3 * PAGE_SIZE, b"\x09" * 8)             # placed before anyone touches it
        got = []
        started = time.monotonic()
        reader = threading.Thread(
            target=lambda: got.append((threading.get_native_id(), provider.read(2 * PAGE_SIZE, 4))))
        reader.start()
        reader.join(5)
        waited = time.monotonic() - started
        assert not reader.is_alive()
        assert provider.read(3 * PAGE_SIZE, 9) == b"\x09" * 8 + b"\x00"
    thread, data = got[0]
    assert data == b"\x03" * 4 and calls == [2 * PAGE_SIZE]     # only the touched page was asked for
    assert 0.2 <= waited < 5
    [fault] = provider.faults
    assert fault.address == mapping + 2 * PAGE_SIZE and not fault.write and fault.thread == thread


def test_a_failing_provider_zero_fills_and_close_raises(mapping):
    def provide(offset):
        raise RuntimeError("backing store gone")

    provider = _provider(mapping, provide)
    assert provider.read(0, 4) == bytes(4)                     # the waiter continued with a zero page
    with pytest.raises(PyKvmError, match="backing store gone"):
        provider.close()


def test_bad_arguments_are_named(mapping):
    with pytest.raises(InvalidArgument, match="address=.*page size"):
        PageProvider(mapping + 1, PAGE_SIZE, bytes)
    with pytest.raises(InvalidArgument, match="provide="):
        PageProvider(mapping, PAGE_SIZE, "not callable")        # type: ignore[arg-type]
    with _provider(mapping, lambda offset: b"") as provider:
        with pytest.raises(InvalidArgument, match="at most 4096"):
            provider.fill(0, bytes(PAGE_SIZE + 1))
        with pytest.raises(ArgumentTypeError, match="data="):
            provider.fill(0, "text")                            # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match="offset="):
            provider.fill(4 * PAGE_SIZE, b"")
    with Userfaultfd() as uffd:
        assert uffd.fd >= 0
    with pytest.raises(ValueError, match="closed"):
        uffd.fd


def test_a_guest_reads_a_page_that_arrives_late(vm, vcpu):
    slot = vm.memory.add_slot(0x2000000, 4 * PAGE_SIZE)
    with vm.memory.provide_pages(slot.slot, lambda gpa: gpa.to_bytes(8, "little")) as provider:
        x86.load_code(vcpu, "mov 0x2002000, %rax\nout %eax, $0x10\nhlt\n")
        exit = vcpu.run()
    assert isinstance(exit, IoExit) and exit.value == 0x2002000   # the provider got the guest-physical address
    assert [fault.address - provider.address for fault in provider.faults] == [2 * PAGE_SIZE]


def test_vm_memory_reads_and_writes_a_missing_page_without_hanging(vm):
    slot = vm.memory.add_slot(0x2000000, 4 * PAGE_SIZE)
    result: dict = {}

    def host_access() -> None:
        result["read"] = vm.memory.read(0x2001000, 8)             # faults: the provider must get the GIL
        vm.memory.write(0x2003000, b"written")
        result["written"] = vm.memory.read(0x2003000, 7)

    with vm.memory.provide_pages(slot.slot, lambda gpa: gpa.to_bytes(8, "little")) as provider:
        worker = threading.Thread(target=host_access, daemon=True)
        worker.start()
        worker.join(timeout=10)
        assert not worker.is_alive(), "vm.memory.read of a missing page hung"
    assert result == {"read": (0x2001000).to_bytes(8, "little"), "written": b"written"}
    assert sorted(fault.address - provider.address for fault in provider.faults) == [PAGE_SIZE, 3 * PAGE_SIZE]
