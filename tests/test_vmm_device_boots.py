"""Hardware tests of pc-testdev's MMIO window and flush port, PCI with pci-testdev, and the VMware backdoor.

Small guests assembled here (32-bit, paging off, loaded as Multiboot a.out
kernels) report what they read to a probe port the test adds; each device's
effect is checked against a control without it. Then kvm-unit-tests' own
``emulator``, ``lam``, ``vmexit`` (pci-mem, pci-io) and ``vmware_backdoors``
flats, when ``PYKVM_KUT_DIR`` names a built kvm-unit-tests tree (else those
skip).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pykvm import x86
from pykvm.core.binding import ffi
from pykvm.core.constants import Cap
from pykvm.core.exits import IoExit
from pykvm.runtime import trace
from pykvm.vmm import Ending, Machine
from pykvm.vmm.testdev import FlushPage, Scratch

TIMEOUT = 60.0
PROBE = 0xA8            # below 0x100: the guest writes it with `out %eax, $PROBE`
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


# ---- PCI and pci-testdev -----------------------------------------------------------------------

def config_read(register_address: int) -> str:
    return f"mov ${register_address:#x}, %eax\n mov $0xcf8, %dx\n out %eax, %dx\n mov $0xcfc, %dx\n in %dx, %eax\n" \
           f" out %eax, ${PROBE}\n"


SCAN = config_read(0x80000000) + config_read(0x80001000) + config_read(0x80001010) + config_read(0x80001014)


@pytest.mark.parametrize("device", [True, False])
def test_the_guest_finds_pci_testdev_and_its_bars_only_when_added(kvm, device):
    values, _ = boot(kvm, SCAN, devices=["pci-testdev"] if device else [])
    if device:
        assert values == [0x12378086, 0x00051B36, 0xFEBFF000, 0xC001]
    else:
        assert values == [0x12378086] + [0xFFFFFFFF] * 3


def memory_test(number: int) -> str:
    """As lib/pci-testdev.c on the memory BAR: select test ``number``, report its width, write 16 times,
    report the count."""
    return f"""
        mov $0xfebff000, %ebx
        movb ${number}, (%ebx)
        movzbl 1(%ebx), %eax
        out %eax, ${PROBE}
        mov 8(%ebx), %esi
        mov 4(%ebx), %edi
        add %ebx, %edi
        mov $16, %ecx
    2:  mov %esi, (%edi)
        loop 2b
        {report("12(%ebx)")}
    """


def io_test(number: int) -> str:
    """The same on the IO BAR."""
    return f"""
        mov $0xc000, %dx
        mov ${number}, %al
        out %al, %dx
        mov $0xc001, %dx
        in %dx, %al
        movzbl %al, %eax
        out %eax, ${PROBE}
        mov $0xc008, %dx
        in %dx, %eax
        mov %eax, %esi
        mov $0xc004, %dx
        in %dx, %eax
        lea 0xc000(%eax), %edx
        mov $16, %ecx
    2:  mov %esi, %eax
        out %eax, %dx
        loop 2b
        mov $0xc00c, %dx
        in %dx, %eax
        out %eax, ${PROBE}
    """


def test_pci_testdev_counts_exiting_writes_and_ioeventfds_keep_the_others_in_kvm(kvm):
    if not kvm.check_extension(Cap.IOEVENTFD):
        pytest.skip("this KVM has no KVM_CAP_IOEVENTFD")
    body = "".join(memory_test(number) + io_test(number) for number in range(4))
    values, _ = boot(kvm, body, devices=["pci-testdev"])
    pairs = list(zip(values[::2], values[1::2], strict=True))      # (width, count) per test and BAR
    # no-eventfd: all 16 writes reach the device; the eventfd tests' writes stay in KVM; 3 is no test
    assert pairs == [(4, 16), (4, 16), (4, 0), (4, 0), (4, 0), (4, 0), (0, 0), (0, 0)]


# ---- VMware backdoor -------------------------------------------------------------------------

def backdoor(command: int) -> str:
    return f"""
        mov $0x564d5868, %eax
        mov $0xdeadbeef, %ebx
        mov ${command:#x}, %ecx
        mov $0x5658, %dx
        in (%dx), %eax
        out %eax, ${PROBE}
        mov %ebx, %eax
        out %eax, ${PROBE}
        mov %ecx, %eax
        out %eax, ${PROBE}
    """


def test_the_backdoor_answers_get_version_in_the_registers(kvm):
    values, _ = boot(kvm, backdoor(10) + backdoor(0xFFF))
    assert values == [6, 0x564D5868, 2] + [0xFFFFFFFF, 0xDEADBEEF, 0xFFF]


# ---- kvm-unit-tests ----------------------------------------------------------------------------

def kut(kvm, flat: Path, **options):
    result = Machine(flat, kvm=kvm, **options).run(timeout=TIMEOUT)
    assert result.ending != Ending.TIMEOUT, result.text
    return result


def verdicts(text: str) -> dict[str, int]:
    return {kind: len(re.findall(f"^{kind}: ", text, re.M)) for kind in ("PASS", "FAIL", "SKIP")}


def test_kut_emulator_passes_its_mmio_tests(kvm, kut_flat):
    result = kut(kvm, kut_flat("emulator"))
    assert verdicts(result.text)["FAIL"] == 0 and verdicts(result.text)["PASS"] >= 97
    assert "PASS: cross-page mmio read" in result.lines and "PASS: cross-page mmio write" in result.lines
    assert not [u for u in result.unknown if u.space == "mmio"]


def test_kut_lam(kvm, kut_flat):
    result = kut(kvm, kut_flat("lam"))
    assert result.status == PASS and "SUMMARY: 16 tests, 1 skipped" in result.lines


@pytest.mark.parametrize("device", [True, False])
def test_kut_vmexit_times_pci_testdev_only_when_added(kvm, kut_flat, device):
    # Only the IO BAR's three timings are run: vmexit times each for at least 2^30 TSC cycles, whatever the
    # exits cost, and the memory BAR's decoding and ioeventfds have their unit tests (test_vmm_pci.py).
    result = kut(kvm, kut_flat("vmexit"), cmdline="pci-io", devices=["pci-testdev"] if device else [])
    timed = [match.groups() for line in result.lines if (match := re.fullmatch(r"(\S+):(pci-mem|pci-io) \d+", line))]
    if device:
        assert "pci-testdev at 0x10 membar febff000 iobar c000" in result.lines
        paths = ("no-eventfd", "wildcard-eventfd", "datamatch-eventfd")
        assert timed == [(f"portio-{path}", "pci-io") for path in paths]
    else:
        assert "pci-testdev at" not in result.text and timed == []


def test_kut_vmware_backdoors_get_version_from_the_kernel(kvm, kut_flat):
    result = kut(kvm, kut_flat("vmware_backdoors"))
    assert "PASS: vmware_backdoors: port_test: CMD_GETVERSION kernel" in result.lines
    assert "PASS: vmware_backdoors: port_test: RANDOM port user" in result.lines
