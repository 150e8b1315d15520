"""The CMOS update cycle (pykvm.vmm.cmos): UIP around each second, and when an AIE alarm fires (S3's wake)."""

from __future__ import annotations

import pytest

from pykvm.vmm.cmos import Cmos


class Clock:
    def __init__(self) -> None:
        self.now = 100.5

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def cmos(clock: Clock) -> Cmos:
    return Cmos(64 << 20, clock=clock)


def get(cmos: Cmos, register: int) -> int:
    cmos.write(0, 1, register)
    return cmos.read(1, 1)


def put(cmos: Cmos, register: int, value: int) -> None:
    cmos.write(0, 1, register)
    cmos.write(1, 1, value)


@pytest.mark.parametrize(("phase", "uip"), [(0.5, 0), (0.9997, 0), (0.9998, 0x80), (0.0, 0x80), (0.0019, 0x80),
                                            (0.0021, 0)])
def test_uip_is_set_from_244_us_before_each_second_to_the_end_of_the_update(cmos, clock, phase, uip):
    clock.now = 100 + phase
    assert get(cmos, 0x0A) == 0x26 | uip


def test_uip_cannot_be_written(cmos, clock):
    put(cmos, 0x0A, 0xA6)
    assert get(cmos, 0x0A) == 0x26


def test_an_alarm_fires_at_the_end_of_the_next_update_only_with_aie_and_a_matching_time(cmos, clock):
    for register in (1, 3, 5):
        put(cmos, register, 0xC0)                            # don't care, as s3.c sets them
    assert cmos.next_alarm() is None                         # AIE clear: control
    put(cmos, 0x0B, get(cmos, 0x0B) | 0x20)
    assert cmos.next_alarm() == pytest.approx(101.001984)
    clock.now = 101.0005                                     # inside the update: this one still comes
    assert cmos.next_alarm() == pytest.approx(101.001984)
    put(cmos, 5, 0x12)                                       # hours 12: the fixed time matches
    assert cmos.next_alarm() == pytest.approx(101.001984)
    put(cmos, 5, 0x13)                                       # 13: the fixed clock never gets there
    assert cmos.next_alarm() is None
