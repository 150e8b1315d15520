"""The IO-port and MMIO buses: which device answers an address, and what no device answered.

Why this exists: the vCPU loop hands every ``IoExit`` and ``MmioExit`` to a bus,
which finds the device by address (a dict per port, a sorted list of MMIO
ranges) and calls ``device.read(offset, size)`` or ``device.write(offset,
size, value)``. An access no device claims reads as all ones and is ignored
on write, like an empty ISA bus; it is counted with the guest RIP of its
first access, so the end of a run can list what the guest looked for. Every
exit is counted by its :class:`ExitSite` too, so a run tells which ports and
addresses its exits to userspace went to.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Protocol

from ..core.errors import InvalidArgument


class Device(Protocol):
    """What a bus calls; ``offset`` counts from the device's base address."""

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


@dataclasses.dataclass
class UnknownAccess:
    """Accesses to one address no device claims: how many, and where the first came from."""

    space: str              # "io" or "mmio"
    address: int
    count: int
    first_rip: int
    first_vcpu: int
    first_write: bool
    first_size: int

    def describe(self) -> str:
        what = f"port {self.address:#x}" if self.space == "io" else f"MMIO {self.address:#x}"
        first = "write" if self.first_write else "read"
        return (f"unknown {what}: {self.count} access{'es' if self.count != 1 else ''} (first: a "
                f"{self.first_size}-byte {first} by vCPU {self.first_vcpu} at RIP {self.first_rip:#x})")


@dataclasses.dataclass(frozen=True, order=True)
class ExitSite:
    """Where exits to userspace went: an IO port or an MMIO address, read or written (``write``: OUT or store)."""

    space: str              # "io" or "mmio"
    address: int
    write: bool

    def describe(self) -> str:
        if self.space == "io":
            return f"{'out' if self.write else 'in'} port {self.address:#x}"
        return f"MMIO {'write' if self.write else 'read'} {self.address:#x}"


class IoBus:
    """Devices on the 64 Ki IO ports."""

    def __init__(self) -> None:
        self._ports: dict[int, tuple[int, Device, str]] = {}

    def register(self, base: int, length: int, device: Device, name: str = "") -> None:
        if not (isinstance(base, int) and isinstance(length, int) and 0 <= base and length > 0
                and base + length <= 0x10000):
            raise InvalidArgument(f"IO range base={base!r}, length={length!r}: must lie within ports 0-0xffff")
        for port in range(base, base + length):
            if port in self._ports:
                raise InvalidArgument(f"IO port {port:#x} is already claimed by {self._ports[port][2]!r}; "
                                      f"choose a free range")
        for port in range(base, base + length):
            self._ports[port] = (base, device, name or type(device).__name__)

    def lookup(self, port: int) -> tuple[int, Device, str] | None:
        return self._ports.get(port)


class MmioBus:
    """Devices on guest-physical ranges no memory slot backs."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ranges: list[tuple[int, int, Device, str]] = []

    def register(self, base: int, length: int, device: Device, name: str = "") -> None:
        if not (isinstance(base, int) and isinstance(length, int) and base >= 0 and length > 0):
            raise InvalidArgument(f"MMIO range base={base!r}, length={length!r}: expected a non-negative "
                                  f"address and a positive length")
        for start, end, _, other in self._ranges:
            if base < end and start < base + length:
                raise InvalidArgument(f"MMIO range {base:#x}+{length:#x} overlaps {other!r} at "
                                      f"{start:#x}-{end:#x}")
        index = bisect.bisect(self._starts, base)
        self._starts.insert(index, base)
        self._ranges.insert(index, (base, base + length, device, name or type(device).__name__))

    def lookup(self, address: int) -> tuple[int, Device, str] | None:
        index = bisect.bisect(self._starts, address) - 1
        if index >= 0:
            start, end, device, name = self._ranges[index]
            if address < end:
                return start, device, name
        return None
