"""QEMU's pci-testdev (PCI 1b36:0005) as its specification documents it: timed IO exits with and without ioeventfds.

Why this exists: kvm-unit-tests' x86 runner always gives QEMU ``-device
pci-testdev``; ``vmexit`` times guest writes to it (its ``pci-mem`` and
``pci-io`` tests, and the line ``pci-testdev at ... membar ... iobar ...``
every vmexit entry prints), the VMX tests map its memory BAR, and
``lib/pci-testdev.c`` checks it. ``python -m pykvm.boot --device pci-testdev``
(``Machine(devices=("pci-testdev",))``) adds it at device 2, where QEMU's PC
puts it after its ISA bridge at device 1, so the guest sees the same BDF and
BAR addresses (memory 0xfebff000, IO 0xc000).

The device (QEMU's docs/specs/pci-testdev): BAR0 is 4 KiB of memory and BAR1
256 IO ports; each begins with a little-endian header::

    u8 test      write: select test number n (resets count)
    u8 width     1, 2 or 4: the width of the test's writes; 0: no test n here
    u8 pad[2]
    u32 offset   where in this BAR the test's writes go
    u32 data     the value to write
    u32 count    writes the device saw at offset since the test was selected
    char name[]  NUL-terminated

Each BAR has three tests, named as in the specification's example output:
``mmio-``/``portio-`` followed by ``no-eventfd`` (every write exits to this
device, which counts it), ``wildcard-eventfd`` (a ``KVM_IOEVENTFD`` on the
offset: KVM signals an eventfd and the write never leaves the kernel, so
``count`` stays 0) and ``datamatch-eventfd`` (the same, matching only
``data``). The guest accepts either count (``lib/pci-testdev.c``: 0, or
every write). The ioeventfds are assigned when the guest selects a test (the
VM exists by then) and deassigned when it rewrites the command register or a
BAR; on a KVM without ``KVM_CAP_IOEVENTFD`` the writes reach the device and
count. Test 3 and up read width 0, which ends the guest's scan.

Not modelled: BAR2, the optional 64-bit memory BAR without storage.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..core.errors import CapabilityMissing
from .pci import Bar, BarKind, Identity, PciFunction

if TYPE_CHECKING:
    from ..core.eventfds import Ioeventfd
    from ..core.vm import Vm

DEVICE = 2
IDENTITY = Identity(0x1B36, 0x0005, 0x00FF00)       # Red Hat's test device, class "unclassified"
BARS = (Bar(BarKind.MEMORY, 0x1000), Bar(BarKind.IO, 0x100))
HEADER = struct.Struct("<BB2xIII")
TARGET_BASE = 0x40              # test n writes at TARGET_BASE + 4 * n, past the header and name
WIDTH = 4
DATA_BASE = 0xC0DE0000          # test n writes DATA_BASE + n
IO_PORT_LIMIT = 0x10000


class Eventfd(enum.IntEnum):
    """How a test's writes are caught."""

    NONE = 0            # they exit to the device
    WILDCARD = 1        # an ioeventfd on the address, any value
    DATAMATCH = 2       # an ioeventfd on the address and the test's data


TESTS = (("no-eventfd", Eventfd.NONE), ("wildcard-eventfd", Eventfd.WILDCARD),
         ("datamatch-eventfd", Eventfd.DATAMATCH))
PREFIX = {BarKind.MEMORY: "mmio", BarKind.IO: "portio"}


@dataclasses.dataclass
class BarState:
    """One BAR's selected test, its write count, and the ioeventfds assigned in it."""

    selected: int = 0
    count: int = 0
    eventfds: list[Ioeventfd] = dataclasses.field(default_factory=list)
    placed: bool = False


def target(test: int) -> int:
    """The offset test ``test`` writes at."""
    return TARGET_BASE + WIDTH * test


def data(test: int) -> int:
    """The value test ``test`` writes."""
    return DATA_BASE + test


class PciTestdev(PciFunction):
    """The device; ``vm()`` returns the running VM (for its ioeventfds), or None before it exists."""

    def __init__(self, vm: Callable[[], Vm | None]) -> None:
        super().__init__(IDENTITY, BARS)
        self._vm = vm
        self.states = [BarState() for _ in BARS]

    def header(self, index: int) -> bytes:
        """BAR ``index``'s header and name, as the guest reads them."""
        state = self.states[index]
        if state.selected >= len(TESTS):
            return HEADER.pack(state.selected, 0, 0, 0, state.count)
        name = f"{PREFIX[self.bars[index].kind]}-{TESTS[state.selected][0]}".encode() + b"\0"
        return HEADER.pack(state.selected, WIDTH, target(state.selected), data(state.selected), state.count) + name

    def bar_read(self, index: int, offset: int, size: int) -> int:
        return int.from_bytes(self.header(index)[offset:offset + size].ljust(size, b"\0"), "little")

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        state = self.states[index]
        if offset == 0:
            state.selected = value & 0xFF
            state.count = 0
            self._place(index)
        elif state.selected < len(TESTS) and offset == target(state.selected):
            state.count += 1

    def decoding_changed(self) -> None:
        for state in self.states:
            for eventfd in state.eventfds:
                eventfd.close()
            state.eventfds.clear()
            state.placed = False

    def _place(self, index: int) -> None:
        state = self.states[index]
        vm = self._vm()
        address = self.bar_address(index)
        bar = self.bars[index]
        if state.placed or vm is None or address is None or \
                (bar.kind == BarKind.IO and address + bar.size > IO_PORT_LIMIT):
            return
        state.placed = True
        for number, (_, kind) in enumerate(TESTS):
            if kind == Eventfd.NONE:
                continue
            try:
                state.eventfds.append(vm.ioeventfd(address + target(number), WIDTH, pio=bar.kind == BarKind.IO,
                                                   datamatch=data(number) if kind == Eventfd.DATAMATCH else None))
            except CapabilityMissing:
                return
