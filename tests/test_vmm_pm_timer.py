"""The ACPI PM timer (pykvm.vmm.pm_timer) on a fake nanosecond clock: rate, width, wrap, byte reads."""

from __future__ import annotations

import pytest

from pykvm.core.errors import InvalidArgument
from pykvm.vmm.pm_timer import FREQUENCY_HZ, PmTimer


class Clock:
    def __init__(self, ns: int = 5_000_000_000) -> None:     # not 0: the count starts at the device's birth
        self.ns = ns

    def __call__(self) -> int:
        return self.ns


def test_it_counts_3579545_ticks_a_second_from_zero():
    clock = Clock()
    timer = PmTimer(clock=clock)
    assert timer.read(0, 4) == 0
    clock.ns += 1_000_000_000
    assert timer.read(0, 4) == FREQUENCY_HZ == 3_579_545
    clock.ns += 1_000                                      # 1 us: 3.58 ticks
    assert timer.read(0, 4) == FREQUENCY_HZ + 3


@pytest.mark.parametrize("bits", [24, 32])
def test_it_wraps_at_its_width(bits):
    clock = Clock()
    timer = PmTimer(bits, clock)
    wrap_ns = -(-(1 << bits) * 1_000_000_000 // FREQUENCY_HZ)     # the first ns at or past the wrap
    clock.ns += wrap_ns - 1_000
    assert timer.value > (1 << bits) - 10
    clock.ns += 1_000
    assert timer.value < 10


def test_reads_of_any_width_and_offset_give_those_bytes_and_writes_are_ignored():
    clock = Clock()
    timer = PmTimer(clock=clock)
    clock.ns += 0x12345678 * 1_000_000_000 // FREQUENCY_HZ + 1
    value = timer.read(0, 4)
    assert value >> 24 == 0x12
    assert [timer.read(i, 1) for i in range(4)] == list(value.to_bytes(4, "little"))
    assert timer.read(2, 2) == value >> 16
    timer.write(0, 4, 0)
    assert timer.read(0, 4) == value


@pytest.mark.parametrize("bits", [16, 64, True, "32"])
def test_a_width_other_than_24_or_32_is_refused(bits):
    with pytest.raises(InvalidArgument, match="24 or 32 bits"):
        PmTimer(bits)
