"""Hardware tests of the platform devices: small Multiboot guests assembled here reset the machine, suspend
to S3 and wake, power off through S5; then kvm-unit-tests' own flats (``s3``, ``init``, ``vmexit
inl_from_pmtimer``, ``hpet_read_test``) when ``PYKVM_KUT_DIR`` names a built kvm-unit-tests tree.

Each trigger has a control: the same guest without the write that triggers, which must end otherwise.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pykvm.vmm import Ending, Machine, acpi
from pykvm.x86.asm import assemble

TIMEOUT = 30.0
LOAD = 0x100000
# A Multiboot header with the address fields (flag 16): the image loads at LOAD and starts at `start`.
HEADER = f"""
    .long 0x1BADB002, 0x00010000, -(0x1BADB002 + 0x00010000)
    .long {LOAD:#x}, {LOAD:#x}, 0, 0, start
start:
"""
EXIT = "mov $EXIT_CODE, %eax; out %eax, $0xf4; 1: hlt; jmp 1b\n"


def kernel(body: str, **defines: int) -> bytes:
    return assemble(HEADER + body + EXIT, "protected", LOAD, {"EXIT_CODE": 0x2A, **defines}).code


def run(image: bytes, cpus: int = 1, timeout: float = TIMEOUT, kvm=None):
    return Machine(image, cpus=cpus, kvm=kvm).run(timeout=timeout)


RESETS = {
    "port 0x92": ("in $0x92, %al; and $0xFE, %al; out %al, $0x92; or $FLAG, %al; out %al, $0x92\n", 1,
                  "port 0x92 bit 0 (fast reset)"),
    "0xcf9": ("mov $0xCF9, %dx; mov $0, %al; out %al, %dx; mov $(2 | FLAG * 4), %al; out %al, %dx\n", 1,
              "port 0xcf9 (hard reset, 0x06 written)"),
    "8042": ("1: in $0x64, %al; test $2, %al; jnz 1b; mov $(0xFF - FLAG), %al; out %al, $0x64\n", 1,
             "port 0x64 command 0xfe (keyboard controller reset)"),
}


@pytest.mark.parametrize("way", sorted(RESETS))
def test_a_reset_ends_the_run_with_status_0(kvm, way):
    body, flag, reason = RESETS[way]
    result = run(kernel(body, FLAG=flag), kvm=kvm)
    assert (result.ending, result.status, result.exit_code) == (Ending.RESET, 0, None)
    assert reason in result.message


@pytest.mark.parametrize("way", sorted(RESETS))
def test_control_the_same_writes_without_the_reset_bit_run_on(kvm, way):
    body, _, _ = RESETS[way]
    result = run(kernel(body, FLAG=0), kvm=kvm)
    assert (result.ending, result.exit_code) == (Ending.EXIT_PORT, 0x2A)


# Suspend to S3 with the RTC alarm (every field "don't care", AIE) as the wake event when RTC_EN is
# given; the waking vector is a real-mode stub copied to 0x2000 that reports PM1_STS >> 10 (RTC_STS
# in bit 0, WAK_STS in bit 5) through the debug-exit port.
S3 = """
    mov $stub, %esi; mov $0x2000, %edi; mov $(stub_end - stub), %ecx; rep movsb
    movl $0x2000, FACS + 12
    mov $1, %al; out %al, $0x70; mov $0xC0, %al; out %al, $0x71
    mov $3, %al; out %al, $0x70; mov $0xC0, %al; out %al, $0x71
    mov $5, %al; out %al, $0x70; mov $0xC0, %al; out %al, $0x71
    mov $0x0B, %al; out %al, $0x70; mov $0x22, %al; out %al, $0x71
    mov $0x602, %dx; mov $RTC_EN, %ax; out %ax, %dx
    mov $0x604, %dx; mov $(SLP_TYP << 10 | 0x2000), %ax; out %ax, %dx
    jmp after
    .code16
stub:
    mov $0x600, %dx; in %dx, %ax; shr $10, %ax
    mov $0xf4, %dx; out %ax, %dx
1:  hlt; jmp 1b
stub_end:
    .code32
after:
"""


@pytest.mark.parametrize("cpus", [1, 2])
def test_s3_sleeps_until_the_rtc_alarm_then_resumes_at_the_waking_vector_in_real_mode(kvm, cpus):
    result = run(kernel(S3, FACS=acpi.FACS_ADDRESS, RTC_EN=0x400, SLP_TYP=1), cpus, kvm=kvm)
    assert (result.ending, result.exit_code) == (Ending.EXIT_PORT, 0x21), result.message   # WAK_STS, RTC_STS
    assert result.elapsed < 3.0                              # the alarm comes within a second
    # the sleep (to the next second's alarm) is the guest's own time, besides vCPU 0's inside KVM_RUN
    assert 0.0 < result.asleep <= result.elapsed and result.asleep < 1.5
    assert result.guest_seconds == pytest.approx(result.in_kvm_run[0] + result.asleep)


def test_control_s3_without_rtc_en_sleeps_until_the_timeout(kvm):
    result = run(kernel(S3, FACS=acpi.FACS_ADDRESS, RTC_EN=0, SLP_TYP=1), timeout=2.5, kvm=kvm)
    assert result.ending == Ending.TIMEOUT and "asleep in ACPI S3" in result.message
    assert 2.0 < result.asleep <= result.elapsed             # asleep from the request to the timeout


def test_s5_powers_off_and_an_undeclared_sleep_type_is_ignored(kvm):
    result = run(kernel(S3, FACS=acpi.FACS_ADDRESS, RTC_EN=0x400, SLP_TYP=7), kvm=kvm)
    assert (result.ending, result.status) == (Ending.POWER_OFF, 0) and "S5" in result.message
    result = run(kernel(S3, FACS=acpi.FACS_ADDRESS, RTC_EN=0x400, SLP_TYP=2), kvm=kvm)
    assert (result.ending, result.exit_code) == (Ending.EXIT_PORT, 0x2A)


def test_waking_without_a_waking_vector_ends_the_run_with_the_reason(kvm):
    result = run(kernel(S3, FACS=acpi.FACS_ADDRESS - 0x1000, RTC_EN=0x400, SLP_TYP=1), kvm=kvm)
    assert result.ending == Ending.ERROR and "Firmware_Waking_Vector is 0" in result.message


# ---- kvm-unit-tests ------------------------------------------------------------------------------

def kut(kvm, flat: Path, cpus: int = 1, args: str = ""):
    return Machine(flat, cpus=cpus, cmdline=args, kvm=kvm).run(timeout=120)


def test_kut_s3_finds_the_facs_suspends_and_resumes(kvm, kut_flat):
    result = kut(kvm, kut_flat("s3"))
    assert "PM1a event registers at 600" in result.lines
    assert (result.ending, result.status) == (Ending.EXIT_PORT, 1)       # QEMU: status 1 as well


def test_kut_init_ends_at_its_first_reset_as_qemu_with_no_reboot(kvm, kut_flat):
    result = kut(kvm, kut_flat("init"))
    assert result.lines[-1] == "testing port 92 init... "
    assert (result.ending, result.status) == (Ending.RESET, 0)


def test_kut_vmexit_reads_the_pm_timer_port_from_the_fadt(kvm, kut_flat):
    result = kut(kvm, kut_flat("vmexit"), args="inl_from_pmtimer")
    assert "PM timer port is 608" in result.lines
    assert any(line.startswith("inl_from_pmtimer ") for line in result.lines)
    assert all(u.address != 0xCCCC for u in result.unknown)


def test_kut_hpet_read_test_passes(kvm, kut_flat):
    result = kut(kvm, kut_flat("hpet_read_test"))
    assert any(line.startswith("PASS: read test took") for line in result.lines), result.text
    assert result.status == 1 and result.unknown == []
