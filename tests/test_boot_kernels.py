"""Hardware tests: boot each test kernel (guests/kernels) with 1 and 2 vCPUs; assert transcript and status.

Each kernel does one thing and reports through COM1 and the debug-exit port
(status (v << 1) | 1). Run on this machine's KVM and under
``python -m pykvm.hosts tcg-amd -- ...`` (kvm_amd).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest

from pykvm.testing import popen_interruptible
from pykvm.vmm import Ending, Machine, testkernels
from pykvm.vmm.multiboot import e820_map

SMP = [1, 2]
TIMEOUT = 60.0          # generous: the emulated host runs these in nested, software-emulated KVM
PASS = 1                # a write of 0 to the debug-exit port


def boot(kvm, name: str, cpus: int = 1, **options):
    result = Machine(testkernels.path(name), cpus=cpus, kvm=kvm, **options).run(timeout=TIMEOUT)
    assert result.ending != Ending.TIMEOUT, f"{name} timed out; transcript so far:\n{result.text}"
    return result


@pytest.mark.parametrize("cpus", SMP)
def test_hello_prints_its_line_and_exits(kvm, cpus):
    result = boot(kvm, "hello", cpus)
    assert result.text == "Hello from a Multiboot kernel on pykvm\n"
    assert (result.status, result.ending, result.exit_code) == (PASS, Ending.EXIT_PORT, 0)
    assert result.unknown == []
    assert result.first_byte is not None and result.first_byte <= result.elapsed


def test_the_a_out_kludge_image_boots_the_same(kvm):
    result = boot(kvm, "hello-aout.bin")
    assert (result.text, result.status) == ("Hello from a Multiboot kernel on pykvm\n", PASS)


@pytest.mark.parametrize("cpus", SMP)
@pytest.mark.parametrize("code", [0, 3, 42, 127])
def test_exit_code_is_the_guests_own(kvm, cpus, code):
    result = boot(kvm, "exitcode", cpus, cmdline=f"console=ttyS0 exit={code}")
    assert result.lines == [f"command line: console=ttyS0 exit={code}", f"exiting with {code}"]
    assert (result.status, result.exit_code) == ((code << 1 | 1) & 0xFF, code)


@pytest.mark.parametrize("cpus", SMP)
def test_triple_fault_is_a_distinct_status_and_stops_every_vcpu(kvm, cpus):
    result = boot(kvm, "exitcode", cpus, cmdline="triple")
    assert result.lines[-1] == "triple fault"
    assert (result.ending, result.status) == (Ending.TRIPLE_FAULT, 4)
    assert "triple fault" in result.message and "vCPU 0" in result.message


@pytest.mark.parametrize("strict", [False, True])
def test_unknown_port_and_mmio_are_listed_with_their_rip(kvm, strict):
    result = boot(kvm, "exitcode", cmdline="unknown", strict_io=strict)
    first = result.unknown[0]
    assert (first.space, first.address, first.first_write, first.first_size) == ("io", 0x1234, False, 1)
    assert 0x100000 <= first.first_rip < 0x101000
    if strict:
        assert (result.ending, result.status, len(result.unknown)) == (Ending.STRICT_IO, 8, 1)
        assert "port 0x1234" in result.message
    else:
        assert result.status == PASS
        assert [(u.space, u.address, u.count) for u in result.unknown] == [("io", 0x1234, 2),
                                                                           ("mmio", 0xD0000000, 2)]


@pytest.mark.parametrize("cpus", SMP)
def test_fw_cfg_gives_cpus_ram_cmdline_and_e820(kvm, cpus):
    result = boot(kvm, "fwcfg", cpus, memory=64, cmdline="quiet root=/dev/null")
    expected = ["fw_cfg: signature QEMU", f"fw_cfg: NB_CPUS {cpus}, MAX_CPUS {cpus}, RAM 64 MiB",
                "fw_cfg: command line: quiet root=/dev/null", "fw_cfg: etc/e820 has 4 entries"]
    expected += [f"e820: {address:#018x} length {length:#018x} type {kind}"
                 for address, length, kind in e820_map(64 << 20)]
    assert result.lines == expected
    assert result.status == PASS


@pytest.mark.parametrize("cpus", SMP)
def test_long_mode(kvm, cpus):
    result = boot(kvm, "longmode", cpus)
    assert result.lines == ["longmode: entering long mode",
                            "longmode: EFER.LMA set, 64-bit register 0x0123456789abcdef"]
    assert result.status == PASS


@pytest.mark.parametrize("cpus", SMP + [3])
def test_aps_start_with_init_sipi_and_report_their_apic_id(kvm, cpus):
    result = boot(kvm, "smp", cpus)
    assert result.lines[0] == f"smp: BSP APIC ID 0, fw_cfg NB_CPUS {cpus}"
    assert sorted(result.lines[1:-1]) == [f"smp: AP APIC ID {apic} started" for apic in range(1, cpus)]
    assert result.lines[-1] == f"smp: {cpus} CPUs up"
    assert result.status == PASS


@pytest.mark.parametrize("cpus", SMP)
def test_pit_ticks_through_the_8259(kvm, cpus):
    result = boot(kvm, "pit", cpus)
    assert result.lines == ["pit: 8254 at 100 Hz on IRQ 0, 8259 at vector 0x20", "pit: took 10 timer interrupts"]
    assert result.status == PASS
    assert result.elapsed >= 0.09          # 10 ticks of 10 ms


@pytest.mark.parametrize("cpus", SMP)
def test_ioapic_edge_and_level_through_a_test_irq_line(kvm, host, cpus):
    result = boot(kvm, "ioapic", cpus)
    # Where the LAPIC keeps nothing in service (kvm_pvm), the EOI never reaches the IOAPIC.
    irr = "clear" if host.lapic_tracks_in_service else "still set"
    assert result.lines == ["ioapic: edge-triggered GSI 10: 1 interrupt(s)",
                            "ioapic: level-triggered GSI 10: 2 interrupt(s)",
                            f"ioapic: remote IRR {irr} after EOI"]
    assert result.status == PASS


def test_boot_modules_are_placed_after_the_kernel(kvm, tmp_path):
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"module payload")
    machine = Machine(testkernels.path("hello"), kvm=kvm, modules=[initrd, b"second"])
    (first, second) = machine.layout.modules
    assert first[0] % 4096 == 0 and first[0] >= machine.image.end and first[1] - first[0] == 14
    assert second[0] % 4096 == 0 and second[0] >= first[1]
    assert machine.run(timeout=TIMEOUT).status == PASS


def boot_command(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pykvm.boot", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.mark.parametrize("cpus", SMP)
def test_the_command_prints_serial_and_exits_with_the_guests_status(kvm, cpus):
    done = boot_command(str(testkernels.path("exitcode")), "--smp", str(cpus), "--append", "exit=5",
                        "--timeout", str(TIMEOUT))
    assert done.stdout == "command line: exit=5\nexiting with 5\n"
    # nothing on stderr but, on a KVM that lacks one of qemu64's features, QEMU's warning about it
    errors = re.sub(r"pykvm boot: warning: host doesn't support requested feature: .*\n", "", done.stderr)
    assert (done.returncode, errors) == (11, "")


@pytest.mark.host_independent
@pytest.mark.parametrize("cpus", SMP)
def test_the_command_times_out_with_124(kvm, cpus):
    done = boot_command(str(testkernels.path("exitcode")), "--append", "hang", "--smp", str(cpus), "--timeout", "1")
    assert done.stdout == "command line: hang\nhalting forever\n"
    assert done.returncode == 124, done.stderr
    assert "timeout" in done.stderr


@pytest.mark.host_independent
@pytest.mark.parametrize("cpus", SMP)
def test_ctrl_c_ends_the_command_with_130(kvm, cpus):
    process = popen_interruptible([sys.executable, "-m", "pykvm.boot", str(testkernels.path("exitcode")), "--smp",
                                   str(cpus), "--append", "hang"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "command line: hang\n"
        assert process.stdout.readline() == "halting forever\n"
        process.send_signal(signal.SIGINT)
        _, errors = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 130, errors
    assert "interrupted" in errors and "Traceback" not in errors


def test_the_command_reports_a_triple_fault_and_unknown_io(kvm):
    done = boot_command(str(testkernels.path("exitcode")), "--append", "triple", "--trace-exits")
    assert done.returncode == 4
    assert "triple fault" in done.stderr and "exits to userspace: vCPU 0:" in done.stderr
    assert "out port 0x3f8" in done.stderr
    done = boot_command(str(testkernels.path("exitcode")), "--append", "unknown", "--strict-io")
    assert done.returncode == 8 and "unknown port 0x1234" in done.stderr
