"""The ACPI power-management timer: a free-running 3.579545 MHz counter at the FADT's PM_TMR_BLK.

Why this exists: ACPI kernels calibrate and keep time with it, and
kvm-unit-tests' ``vmexit inl_from_pmtimer`` measures an exit to userspace by
reading it (the port comes from the FADT, :mod:`.acpi`). The count is derived
from a host monotonic clock (nanoseconds since the device was made), so it
never goes backwards and runs at the right rate whatever the guest does; it is
24 or 32 bits wide (the FADT's TMR_VAL_EXT flag says which) and wraps.

Modelled: the counter, read at any width and offset within its 4 bytes.
Not modelled: TMR_STS in PM1_STS (set when the top bit toggles) and the SCI it
can raise; writes are ignored, as the register is read-only.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..core.errors import InvalidArgument

PORT = 0x608
PORTS = 4
FREQUENCY_HZ = 3_579_545
NS_PER_S = 1_000_000_000


class PmTimer:
    """The counter: ``bits`` wide (24 or 32), counting from 0 when made; ``clock`` gives nanoseconds."""

    def __init__(self, bits: int = 32, clock: Callable[[], int] = time.monotonic_ns) -> None:
        if isinstance(bits, bool) or bits not in (24, 32):
            raise InvalidArgument(f"bits={bits!r}: an ACPI PM timer is 24 or 32 bits wide (FADT flag TMR_VAL_EXT)")
        self.bits = bits
        self._clock = clock
        self._start = clock()

    @property
    def value(self) -> int:
        """The count now."""
        return (self._clock() - self._start) * FREQUENCY_HZ // NS_PER_S & ((1 << self.bits) - 1)

    def read(self, offset: int, size: int) -> int:
        return self.value >> 8 * offset & ((1 << 8 * size) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        pass
