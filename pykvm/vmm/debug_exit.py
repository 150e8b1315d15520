"""The debug-exit port (0xf4, 4 bytes), as QEMU's ``isa-debug-exit``: a write of v ends the run.

Why this exists: it is how a test kernel reports its result. The machine's exit
status is ``(v << 1) | 1`` (odd, so it never reads as success from a shell
unless the kernel means it, and never collides with pykvm's own statuses,
which are even, except 1 for a pykvm error as QEMU's own errors).
"""

from __future__ import annotations

from collections.abc import Callable

PORT = 0xF4
PORTS = 4


def status_of(value: int) -> int:
    """The process exit status for a write of ``value`` (what a shell sees: the low 8 bits)."""
    return ((value << 1) | 1) & 0xFF


class DebugExit:
    """Calls ``on_exit(value)`` when the guest writes ``value``; reads give 0."""

    def __init__(self, on_exit: Callable[[int], None]) -> None:
        self._on_exit = on_exit

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self._on_exit(value)
