"""Test devices as in QEMU's pc-testdev: IRQ lines at 0x2000+n and an echo port at 0xe0.

Why this exists: test kernels need to raise an interrupt on a chosen GSI at a
chosen moment, and to see that port IO round-trips. A byte written to
``0x2000 + n`` drives GSI n (0-23) high (non-zero) or low (zero) through
``KVM_IRQ_LINE``, so one ``out`` makes an edge or holds a level line; reading
gives the level last driven. Port 0xe0 (4 bytes) returns what was last
written there, at any width.
"""

from __future__ import annotations

from collections.abc import Callable

IRQ_BASE = 0x2000
IRQ_LINES = 24
ECHO_PORT = 0xE0
ECHO_PORTS = 4


class IrqLines:
    """``set_line(gsi, level)`` for each byte write to ``IRQ_BASE + gsi``."""

    def __init__(self, set_line: Callable[[int, int], object]) -> None:
        self._set_line = set_line
        self.levels = [0] * IRQ_LINES

    def read(self, offset: int, size: int) -> int:
        return self.levels[offset]

    def write(self, offset: int, size: int, value: int) -> None:
        level = int(bool(value & 0xFF))
        self.levels[offset] = level
        self._set_line(offset, level)


class EchoPort:
    """Four bytes of storage: reads return what was written (little-endian, at the offset)."""

    def __init__(self) -> None:
        self.value = bytearray(ECHO_PORTS)

    def read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.value[offset:offset + size].ljust(size, b"\xff"), "little")

    def write(self, offset: int, size: int, value: int) -> None:
        data = value.to_bytes(size, "little")[:ECHO_PORTS - offset]
        self.value[offset:offset + len(data)] = data
