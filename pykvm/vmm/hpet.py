"""A minimal HPET (IA-PC HPET specification 1.0a) at MMIO 0xfed00000: the main counter and its registers.

Why this exists: kernels use the HPET's main counter as a clock, and
kvm-unit-tests' ``hpet_read_test`` reads it from every vCPU (monotonic, never
backwards, even while another vCPU turns it on and off) at the fixed address
PCs put it. The ACPI HPET table (:mod:`.acpi`) describes it.

Modelled:

* GCAP_ID (0x000, read-only): revision 1, :data:`TIMERS` timers, a 64-bit
  counter, no legacy replacement route, vendor 0x8086, a period of
  :data:`PERIOD_FS` femtoseconds (10 ns: 100 MHz).
* GEN_CONF (0x010): ENABLE_CNF starts and stops the main counter (LEG_RT_CNF
  stays 0: there is no legacy route).
* GINTR_STA (0x020): always 0.
* MAIN_CNT (0x0f0): while enabled it counts the 10 ns ticks of a host
  monotonic clock (edges, so turning it on and off often loses no time);
  while halted it holds; a write sets it.
* Each timer's configuration (Tn_INT_TYPE_CNF, Tn_INT_ENB_CNF, Tn_32MODE_CNF
  and Tn_INT_ROUTE_CNF kept) and comparator registers, as storage.

Not modelled: timer interrupts. Every timer says so in its capabilities
(Tn_INT_ROUTE_CAP 0, no FSB delivery, no periodic mode), so a guest sees that
no timer can interrupt. Registers are 64-bit; accesses of any width and offset
within one register read or merge into it, as the spec's 32-bit halves.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

from ..core.errors import InvalidArgument

BASE = 0xFED00000
SIZE = 0x400
PERIOD_FS = 10_000_000              # 10 ns: at most 100 ns (0x05F5E100 fs) per the spec
FS_PER_NS = 1_000_000
TIMERS = 3                          # the spec's minimum
VENDOR_ID = 0x8086
REVISION = 1
TIMER_STRIDE = 0x20
MASK64 = (1 << 64) - 1


class Register(enum.IntEnum):
    """Offsets of the general registers and of timer 0's (timer n adds n * 0x20)."""

    CAPABILITIES = 0x000
    CONFIGURATION = 0x010
    INTERRUPT_STATUS = 0x020
    MAIN_COUNTER = 0x0F0
    TIMER_CONFIGURATION = 0x100
    TIMER_COMPARATOR = 0x108
    TIMER_FSB_ROUTE = 0x110


class CapabilityField(enum.IntEnum):
    """Where GCAP_ID's fields start (bit numbers)."""

    REV_ID = 0
    NUM_TIM_CAP = 8                 # the number of timers less one
    COUNT_SIZE_CAP = 13             # 1: a 64-bit main counter
    VENDOR_ID = 16
    COUNTER_CLK_PERIOD = 32         # femtoseconds per tick


class TimerConfig(enum.IntFlag):
    """Tn_CONF_CAP bits."""

    INT_TYPE_CNF = 1 << 1
    INT_ENB_CNF = 1 << 2
    SIZE_CAP = 1 << 5               # a 64-bit comparator
    MODE32_CNF = 1 << 8
    INT_ROUTE_CNF = 0x1F << 9


ENABLE_CNF = 1
TIMER_WRITABLE = (TimerConfig.INT_TYPE_CNF | TimerConfig.INT_ENB_CNF | TimerConfig.MODE32_CNF
                  | TimerConfig.INT_ROUTE_CNF)


class Hpet:
    """The event timer block; ``clock`` gives nanoseconds (a monotonic clock)."""

    def __init__(self, clock: Callable[[], int] = time.monotonic_ns, timers: int = TIMERS) -> None:
        if isinstance(timers, bool) or not isinstance(timers, int) or not TIMERS <= timers <= 32:
            raise InvalidArgument(f"timers={timers!r}: an HPET block has {TIMERS} to 32 timers")
        self._clock = clock
        self.timers = timers
        self._held = 0                              # the count when halted, or when last enabled
        self._enabled_at: int | None = None         # the clock's tick when enabled; None while halted
        self._timer_config = [0] * timers
        self._comparators = [MASK64] * timers

    @property
    def capabilities(self) -> int:
        """GCAP_ID."""
        field = CapabilityField
        return (PERIOD_FS << field.COUNTER_CLK_PERIOD | VENDOR_ID << field.VENDOR_ID | 1 << field.COUNT_SIZE_CAP
                | (self.timers - 1) << field.NUM_TIM_CAP | REVISION << field.REV_ID)

    @property
    def enabled(self) -> bool:
        return self._enabled_at is not None

    def _tick(self) -> int:
        """Periods of the host clock so far: the counter advances once per tick edge while enabled."""
        return self._clock() * FS_PER_NS // PERIOD_FS

    @property
    def counter(self) -> int:
        """MAIN_CNT now."""
        if self._enabled_at is None:
            return self._held
        return (self._held + self._tick() - self._enabled_at) & MASK64

    def _set_counter(self, value: int, enable: bool) -> None:
        self._held = value
        self._enabled_at = self._tick() if enable else None

    def _register(self, offset: int) -> int:
        if offset == Register.CAPABILITIES:
            return self.capabilities
        if offset == Register.CONFIGURATION:
            return ENABLE_CNF if self.enabled else 0
        if offset == Register.MAIN_COUNTER:
            return self.counter
        timer, register = self._timer(offset)
        if register == Register.TIMER_CONFIGURATION:
            return self._timer_config[timer] | TimerConfig.SIZE_CAP
        if register == Register.TIMER_COMPARATOR:
            return self._comparators[timer]
        return 0                                    # GINTR_STA, FSB routes, reserved space

    def _write_register(self, offset: int, value: int) -> None:
        if offset == Register.CONFIGURATION:
            if bool(value & ENABLE_CNF) != self.enabled:
                self._set_counter(self.counter, bool(value & ENABLE_CNF))
        elif offset == Register.MAIN_COUNTER:
            self._set_counter(value, self.enabled)
        else:
            timer, register = self._timer(offset)
            if register == Register.TIMER_CONFIGURATION:
                self._timer_config[timer] = value & TIMER_WRITABLE
            elif register == Register.TIMER_COMPARATOR:
                self._comparators[timer] = value

    def _timer(self, offset: int) -> tuple[int, int]:
        """(timer, timer 0's offset of the register) for a timer register; (-1, 0) elsewhere."""
        timer = (offset - Register.TIMER_CONFIGURATION) // TIMER_STRIDE
        if offset < Register.TIMER_CONFIGURATION or timer >= self.timers:
            return -1, 0
        return timer, offset - timer * TIMER_STRIDE

    def read(self, offset: int, size: int) -> int:
        shift = 8 * (offset & 7)
        return self._register(offset & ~7) >> shift & ((1 << 8 * size) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        base, shift = offset & ~7, 8 * (offset & 7)
        mask = ((1 << 8 * size) - 1) << shift & MASK64
        self._write_register(base, self._register(base) & ~mask | value << shift & mask)
