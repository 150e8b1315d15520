"""The ACPI PM1a registers (pykvm.vmm.pm1): sleep requests, wake status, enables; and the waking-vector checks."""

from __future__ import annotations

import pytest

from pykvm.vmm.pm1 import Pm1, SleepType, waking_problem

STATUS, ENABLE, CONTROL = 0, 2, 4          # offsets from the event block (0x600)


@pytest.fixture
def sleeps() -> list[SleepType]:
    return []


@pytest.fixture
def pm1(sleeps) -> Pm1:
    return Pm1(sleeps.append)


def test_sci_en_reads_set_as_there_is_no_smi_command_port(pm1):
    assert pm1.read(CONTROL, 2) == 1
    pm1.write(CONTROL, 2, 0)
    assert pm1.read(CONTROL, 2) == 1


def test_the_s3_request_of_kvm_unit_tests_suspends(pm1, sleeps):
    pm1.write(CONTROL, 2, 0x2400)                            # SLP_TYP 1, SLP_EN
    assert sleeps == [SleepType.S3]
    assert pm1.read(CONTROL, 2) == 0x0401                    # SLP_TYP kept, SLP_EN reads 0, SCI_EN


def test_slp_typ_without_slp_en_does_nothing_and_slp_en_alone_uses_it(pm1, sleeps):
    pm1.write(CONTROL, 2, 7 << 10)
    assert sleeps == [] and pm1.read(CONTROL, 2) == 0x1C01
    pm1.write(CONTROL + 1, 1, 0x3C)                          # high byte: SLP_TYP 7 | SLP_EN
    assert sleeps == [SleepType.S5]


@pytest.mark.parametrize("slp_typ", [0, 2, 3, 4, 5, 6])
def test_a_sleep_type_no_sx_object_gives_does_nothing(pm1, sleeps, slp_typ):
    pm1.write(CONTROL, 2, slp_typ << 10 | 1 << 13)
    assert sleeps == []


def test_rtc_en_makes_the_rtc_a_wake_source_and_other_enables_are_kept(pm1):
    assert not pm1.rtc_wake
    pm1.write(ENABLE, 2, 0x0400)                             # s3.c: outw(0x400, pm1a_evt_blk + 2)
    assert pm1.rtc_wake and pm1.read(ENABLE, 2) == 0x0400
    pm1.write(ENABLE, 2, 0xFFFF)
    assert pm1.read(ENABLE, 2) == 0x0721                     # TMR, GBL, PWRBTN, SLPBTN, RTC


def test_wake_sets_wak_sts_and_rtc_sts_which_clear_on_writing_one(pm1):
    assert pm1.read(STATUS, 2) == 0
    pm1.wake(rtc=True)
    assert pm1.read(STATUS, 2) == 0x8400
    pm1.write(STATUS, 2, 0x0400)
    assert pm1.read(STATUS, 2) == 0x8000
    pm1.write(STATUS, 2, 0x0000)                             # writing 0 leaves it
    assert pm1.read(STATUS, 2) == 0x8000
    pm1.write(STATUS + 1, 1, 0x80)
    assert pm1.read(STATUS, 2) == 0


def test_wider_and_narrower_accesses_see_the_same_registers(pm1):
    pm1.wake(rtc=False)
    pm1.write(ENABLE, 2, 0x0400)
    assert pm1.read(STATUS, 4) == 0x0400_8000
    assert [pm1.read(i, 1) for i in range(6)] == [0x00, 0x80, 0x00, 0x04, 0x01, 0x00]
    pm1.write(STATUS, 4, 0x0000_8000)                        # clears WAK_STS and turns RTC_EN off
    assert pm1.read(STATUS, 4) == 0 and not pm1.rtc_wake


@pytest.mark.parametrize(("vector", "x_vector", "problem"), [
    (0x1000, 0, None),
    (0x12345, 0, None),
    (0, 0, "Firmware_Waking_Vector is 0"),
    (0x100000, 0, "above 1 MiB"),
    (0x1000, 0x2000, "X_Firmware_Waking_Vector is 0x2000"),
])
def test_only_a_real_mode_waking_vector_can_be_honoured(vector, x_vector, problem):
    found = waking_problem(vector, x_vector)
    assert found is None if problem is None else problem in found
