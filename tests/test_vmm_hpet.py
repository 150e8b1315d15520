"""The minimal HPET (pykvm.vmm.hpet) on a fake nanosecond clock: capabilities, enable, counter, timers' storage."""

from __future__ import annotations

import random

import pytest

from pykvm.core.errors import InvalidArgument
from pykvm.vmm.hpet import Hpet

CAPABILITIES, CONFIGURATION, STATUS, COUNTER = 0x000, 0x010, 0x020, 0x0F0


class Clock:
    def __init__(self) -> None:
        self.ns = 7_000_000_000

    def __call__(self) -> int:
        return self.ns


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def hpet(clock: Clock) -> Hpet:
    return Hpet(clock)


def test_the_capabilities_say_10_ns_three_timers_64_bits_and_are_read_only(hpet):
    value = hpet.read(CAPABILITIES, 8)
    assert value >> 32 == 10_000_000                        # fs per tick
    assert value & 0xFF == 1                                # REV_ID
    assert value >> 8 & 0x1F == 2                           # NUM_TIM_CAP: 3 timers
    assert value >> 13 & 1 == 1 and value >> 15 & 1 == 0    # 64-bit counter, no legacy route
    assert value >> 16 & 0xFFFF == 0x8086
    assert (hpet.read(CAPABILITIES, 4), hpet.read(CAPABILITIES + 4, 4)) == (value & 0xFFFFFFFF, value >> 32)
    hpet.write(CAPABILITIES, 8, 0)
    assert hpet.read(CAPABILITIES, 8) == value


def test_the_counter_holds_until_enabled_then_counts_every_10_ns(hpet, clock):
    clock.ns += 5_000
    assert hpet.read(COUNTER, 8) == 0 and hpet.read(CONFIGURATION, 8) == 0
    hpet.write(CONFIGURATION, 8, 1)
    clock.ns += 1_000
    assert hpet.read(COUNTER, 8) == 100
    assert hpet.read(CONFIGURATION, 8) == 1


def test_disabling_holds_the_count_and_enabling_continues_from_it(hpet, clock):
    hpet.write(CONFIGURATION, 8, 1)
    clock.ns += 2_000
    hpet.write(CONFIGURATION, 8, 0)
    clock.ns += 1_000_000
    assert hpet.read(COUNTER, 8) == 200
    hpet.write(CONFIGURATION, 4, 3)                         # LEG_RT_CNF cannot be set: no legacy route
    assert hpet.read(CONFIGURATION, 8) == 1
    clock.ns += 30
    assert hpet.read(COUNTER, 8) == 203
    hpet.write(CONFIGURATION, 8, 1)                         # enabled again: no restart
    assert hpet.read(COUNTER, 8) == 203


def test_toggling_enable_faster_than_a_tick_neither_goes_back_nor_loses_time(hpet, clock):
    steps = random.Random(1)
    seen, enabled_ns = [], 0
    for step in range(2000):                                # 1000 enabled stretches of 1-20 ns
        hpet.write(CONFIGURATION, 8, step % 2)
        ns = steps.randint(1, 20)
        clock.ns += ns
        enabled_ns += ns * (step % 2)
        seen.append(hpet.read(COUNTER, 8))
    assert seen == sorted(seen)
    assert seen[-1] == pytest.approx(enabled_ns / 10, rel=0.05)     # dropping part-ticks would lose ~half


def test_a_write_sets_the_counter_and_32_bit_halves_merge(hpet, clock):
    hpet.write(COUNTER, 8, 0x1_0000_0000)
    hpet.write(COUNTER, 4, 0x20)
    assert hpet.read(COUNTER, 8) == 0x1_0000_0020
    assert hpet.read(COUNTER + 4, 4) == 1
    hpet.write(CONFIGURATION, 8, 1)
    clock.ns += 100
    assert hpet.read(COUNTER, 8) == 0x1_0000_002A


def test_timers_keep_their_comparators_and_writable_config_but_offer_no_route(hpet):
    for timer in range(3):
        config = 0x100 + 0x20 * timer
        value = hpet.read(config, 8)
        assert value >> 32 == 0                             # Tn_INT_ROUTE_CAP: no IOAPIC input
        assert value & (1 << 4 | 1 << 15) == 0              # no periodic mode, no FSB delivery
        assert value & (1 << 5)                             # 64-bit comparator
        hpet.write(config, 8, 0xFFFF_FFFF_FFFF_FFFF)
        assert hpet.read(config, 8) == 0x3F26               # INT_TYPE, INT_ENB, SIZE_CAP, 32MODE, INT_ROUTE
        hpet.write(config + 8, 8, 0x1234 + timer)
        assert hpet.read(config + 8, 8) == 0x1234 + timer
    assert hpet.read(STATUS, 8) == 0
    assert hpet.read(0x100 + 0x20 * 3, 8) == 0              # no fourth timer


@pytest.mark.parametrize("timers", [2, 33, True])
def test_a_timer_count_outside_the_spec_is_refused(timers):
    with pytest.raises(InvalidArgument, match="3 to 32 timers"):
        Hpet(timers=timers)
