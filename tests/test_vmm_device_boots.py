"""Hardware tests of pc-testdev's MMIO window and flush port.

Small guests assembled here (32-bit, paging off, loaded as Multiboot a.out
kernels) report what they read to a probe port the test adds; each device's
effect is checked against a control without it. Then kvm-unit-tests' own
``emulator`` and ``lam`` flats, when ``PYKVM_KUT_DIR`` names a built
kvm-unit-tests tree (else those skip).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from pykvm import x86
from pykvm.core.binding import ffi
from pykvm.core.exits import IoExit
from pykvm.runtime import trace
from pykvm.vmm import Ending, Machine
from pykvm.vmm.testdev import FlushPage, Scratch

TIMEOUT = 60.0
PROBE = 0x90
PASS = 1                # the guest wrote 0 to the debug-exit port
PAGE = 0x300000


class Probe:
    """Port PROBE: the values the guest writes, in order."""

    def __init__(self) -> None:
        self.values: list[int] = []

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.values.append(value)


def kernel(body: str) -> bytes:
    """A Multiboot kernel (the header's address fields) that runs ``body`` and exits with 0."""
    source = f"""
        header: .long 0x1BADB002, 0x10000, -(0x1BADB002 + 0x10000)
                .long header, header, 0, 0, start
        start:
        {body}
                xor %eax, %eax
                out %eax, $0xf4
        1:      hlt
                jmp 1b
    """
    return bytes(x86.assemble(source, "protected", origin=0x100000))


def boot(kvm, body: str, **options) -> tuple[list[int], Machine]:
    probe = Probe()
    machine = Machine(kernel(body), memory=16, kvm=kvm, **options)
    machine.add_io(PROBE, 4, probe, "probe")
    result = machine.run(timeout=TIMEOUT)
    assert (result.ending, result.status) == (Ending.EXIT_PORT, PASS), result.message
    machine.result = result
    return probe.values, machine


def report(expression: str) -> str:
    return f"mov {expression}, %eax\n out %eax, ${PROBE}\n"


# ---- pc-testdev ------------------------------------------------------------------------------

def test_the_mmio_window_stores_what_the_guest_writes_and_unclaimed_mmio_does_not(kvm):
    values, machine = boot(kvm, f"""
        mov $0xff000000, %ebx
        movl $0x11223344, 0x10(%ebx)
        movb $0xaa, 0x11(%ebx)
        {report("0x10(%ebx)")}
        {report("0xfffc(%ebx)")}
        movl $0x11223344, 0xd0000000
        {report("0xd0000000")}
    """)
    assert values == [0x1122AA44, 0, 0xFFFFFFFF]
    assert [(u.space, u.address) for u in machine.result.unknown] == [("mmio", 0xD0000000)]


FLUSH_GUEST = f"""
        mov ${PAGE:#x}, %rbx
        movq $0x1234, (%rbx)
        mov %ebx, %eax
        out %eax, $0xe4
        mov (%rbx), %rax
        out %eax, $0x10
        hlt
"""


@pytest.mark.parametrize("flush", [True, False])
def test_a_flush_makes_kvm_unmap_the_page_and_keeps_its_contents(vm, vcpu, flush):
    try:
        trace.tracefs_root()
    except trace.TracingUnavailable as exc:
        pytest.skip(str(exc))
    x86.load_code(vcpu, FLUSH_GUEST)
    port = FlushPage(lambda: vm.memory) if flush else Scratch(4)   # control: the write goes nowhere
    exit = vcpu.run()
    assert isinstance(exit, IoExit) and (exit.port, exit.value) == (0xE4, PAGE)
    host = int(ffi.cast("uintptr_t", vm.memory.host_pointer(PAGE, 4096)))
    with trace.record("kvm:kvm_unmap_hva_range") as recording:
        port.write(0, 4, exit.value)
    exit = vcpu.run()
    assert isinstance(exit, IoExit) and (exit.port, exit.value) == (0x10, 0x1234)
    pages = [e for e in recording.events if (e.fields["start"], e.fields["end"]) == (host, host + 4096)]
    assert len(pages) == (2 if flush else 0)           # one per change of protection


# ---- kvm-unit-tests ----------------------------------------------------------------------------

def kut_flat(name: str) -> Path:
    root = os.environ.get("PYKVM_KUT_DIR")
    if not root:
        pytest.skip("PYKVM_KUT_DIR is not set (a built kvm-unit-tests tree)")
    flat = Path(root, "x86", f"{name}.flat")
    if not flat.is_file():
        pytest.skip(f"{flat} is not built")
    return flat


def kut(kvm, name: str, **options):
    result = Machine(kut_flat(name), kvm=kvm, **options).run(timeout=TIMEOUT)
    assert result.ending != Ending.TIMEOUT, result.text
    return result


def verdicts(text: str) -> dict[str, int]:
    return {kind: len(re.findall(f"^{kind}: ", text, re.M)) for kind in ("PASS", "FAIL", "SKIP")}


def test_kut_emulator_passes_its_mmio_tests(kvm):
    result = kut(kvm, "emulator")
    assert verdicts(result.text)["FAIL"] == 0 and verdicts(result.text)["PASS"] >= 97
    assert "PASS: cross-page mmio read" in result.lines and "PASS: cross-page mmio write" in result.lines
    assert not [u for u in result.unknown if u.space == "mmio"]


def test_kut_lam(kvm):
    result = kut(kvm, "lam")
    assert result.status == PASS and "SUMMARY: 16 tests, 1 skipped" in result.lines
