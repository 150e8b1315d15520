"""CMOS RAM and the MC146818 RTC at 0x70 (index, bit 7 masks NMI) / 0x71 (data), with a fixed time.

Why this exists: kernels read the wall clock and, old ones, the memory size
from CMOS. The clock is fixed (2024-01-01 12:00:00, a Monday, BCD, 24-hour) so
a run is reproducible; the memory bytes say what the machine has, as a PC BIOS
would write them (0x15/0x16 base KiB, 0x17/0x18 and 0x30/0x31 KiB above 1 MiB,
0x34/0x35 64 KiB blocks above 16 MiB, 0x5b-0x5d 64 KiB blocks above 4 GiB).
The update cycle still runs once a second of a host monotonic clock: register
A's UIP bit is set from 244 us before each whole second to the end of the
update 1984 us after it (kernels wait for it to fall before reading the time),
and :meth:`Cmos.next_alarm` says when an alarm set with AIE would fire (the
wake event of ACPI S3, :mod:`.pm1`); the alarm does not raise IRQ 8 or set
register C's flags.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

INDEX_PORT = 0x70
PORTS = 2
REG_A, REG_B, REG_C, REG_D = 0x0A, 0x0B, 0x0C, 0x0D
UIP = 0x80                      # register A: update in progress
AIE = 0x20                      # register B: alarm interrupt enable
UIP_LEAD = 244e-6               # UIP rises this long before the update...
UPDATE_TIME = 1984e-6           # ...which lasts this long (32.768 kHz time base)
ALARMS = ((0x01, 0x00), (0x03, 0x02), (0x05, 0x04))    # (alarm, time) registers: seconds, minutes, hours
DONT_CARE = 0xC0                # an alarm byte with both top bits set matches any time
FIXED_TIME = {0x00: 0x00, 0x02: 0x00, 0x04: 0x12, 0x06: 0x02, 0x07: 0x01, 0x08: 0x01, 0x09: 0x24, 0x32: 0x20}


class Cmos:
    """128 bytes of CMOS; the clock registers are fixed, the rest remember what is written."""

    def __init__(self, memory_below_4g: int, memory_above_4g: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.ram = bytearray(128)
        self.index = 0
        for register, value in FIXED_TIME.items():
            self.ram[register] = value
        self.ram[REG_A] = 0x26          # 32.768 kHz time base, 1024 Hz rate, UIP clear
        self.ram[REG_B] = 0x02          # 24-hour, BCD, no interrupts
        self.ram[REG_D] = 0x80          # valid RAM and time
        self._set16(0x15, 640)
        extended = min(max(memory_below_4g - (1 << 20), 0) // 1024, 0xFFFF)
        self._set16(0x17, extended)
        self._set16(0x30, extended)
        self._set16(0x34, min(max(memory_below_4g - (16 << 20), 0) >> 16, 0xFFFF))
        high = memory_above_4g >> 16
        self.ram[0x5B:0x5E] = min(high, 0xFFFFFF).to_bytes(3, "little")

    def _set16(self, register: int, value: int) -> None:
        self.ram[register:register + 2] = value.to_bytes(2, "little")

    def _updating(self) -> bool:
        phase = self._clock() % 1.0
        return phase >= 1.0 - UIP_LEAD or phase < UPDATE_TIME

    def next_alarm(self) -> float | None:
        """The ``clock`` time the alarm next fires (the end of an update), or None if it is off or never matches."""
        if not self.ram[REG_B] & AIE:
            return None
        if any(self.ram[alarm] & DONT_CARE != DONT_CARE and self.ram[alarm] != self.ram[current]
               for alarm, current in ALARMS):
            return None
        now = self._clock()
        end = math.floor(now) + UPDATE_TIME
        return end if end > now else end + 1.0

    def read(self, offset: int, size: int) -> int:
        if offset == 0:
            return 0xFF
        register = self.index & 0x7F
        value = self.ram[register]
        if register == REG_C:
            self.ram[REG_C] = 0         # reading C acknowledges
        elif register == REG_A and self._updating():
            value |= UIP
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self.index = value & 0xFF
            return
        register = self.index & 0x7F
        if register in FIXED_TIME or register in (REG_C, REG_D):
            return                      # the clock does not move; C and D are read-only
        self.ram[register] = value & (0x7F if register == REG_A else 0xFF)     # UIP is read-only
