"""The in-kernel 8254 PIT: channel periods, and programming it from the host.

Why this exists: a test of timer interrupts wants "tick every 10 ms" rather than
a reload value and a mode number. Channel 0 drives GSI 0 (IRQ0 of the master
8259, IOAPIC pin 2). Counts and modes as in the Intel 8254 datasheet.
"""

from __future__ import annotations

import dataclasses

from ..core import checks
from ..core.errors import InvalidArgument
from ..core.interrupts import PitChannel
from ..core.vm import Vm

PIT_HZ = 1_193_182          # the 8254's input clock
RW_LSB_THEN_MSB = 3


def period(channel: PitChannel) -> float:
    """Seconds between two terminal counts of ``channel`` (the tick period in modes 2 and 3)."""
    return (channel.count or 0x10000) / PIT_HZ


def channels(vm: Vm) -> tuple[PitChannel, ...]:
    """``KVM_GET_PIT2``: the three channels (count, mode, gate, ...)."""
    checks.instance("vm", vm, Vm, "a pykvm.Vm made with irqchip='kernel', pit=True")
    return vm.get_pit2().channels


def program(vm: Vm, count: int, mode: int = 2, channel: int = 0) -> None:
    """Load ``channel`` with ``count`` in ``mode``, as a guest's OUTs to 0x43/0x40 would (``KVM_SET_PIT2``).

    Mode 2 (rate generator) or 3 (square wave) fires every ``count`` / 1.193182 MHz
    seconds, modes 0, 1 and 4 once.
    """
    checks.instance("vm", vm, Vm, "a pykvm.Vm made with irqchip='kernel', pit=True")
    if isinstance(channel, bool) or not isinstance(channel, int) or not 0 <= channel <= 2:
        raise InvalidArgument(f"channel={channel!r}: the 8254 has channels 0, 1, 2")
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 5:
        raise InvalidArgument(f"mode={mode!r}: the 8254 has modes 0-5")
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 0x10000:
        raise InvalidArgument(f"count={count!r} is outside 1..65536 (65536 is loaded as 0)")
    state = vm.get_pit2()
    loaded = list(state.channels)
    loaded[channel] = dataclasses.replace(loaded[channel], mode=mode, count=count & 0xFFFF,
                                          rw_mode=RW_LSB_THEN_MSB, gate=1)
    vm.set_pit2(dataclasses.replace(state, channels=tuple(loaded)))
