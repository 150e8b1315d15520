"""PCI bus 0 behind configuration mechanism #1 (ports 0xcf8 and 0xcfc), a host bridge, and BAR decoding.

Why this exists: kvm-unit-tests finds its PCI test devices by scanning bus 0
through ports 0xcf8/0xcfc (``pci_find_dev`` in its ``lib/pci.c``), sizes
their BARs by writing all ones, and uses the addresses already programmed in
them: on x86 it assigns none itself, a PC's firmware has done it. Here the
VMM plays the firmware: :meth:`PciHost.add` programs each BAR of a device
(memory BARs top-down from the end of the memory window, IO BARs upward from
the start of the IO window, each aligned to its size, as a PC BIOS commonly
does) and enables its decoding; the guest may move them afterwards.

What is modelled (PCI Local Bus Specification 3.0, 3.2.2.3.2 and 6.1-6.2.5):

* CONFIG_ADDRESS at port 0xcf8, 32-bit accesses only (enable bit 31, bus
  23:16, device 15:11, function 10:8, register 7:0; bits 30:24 read 0);
  narrower accesses there are not configuration accesses and read all ones.
  CONFIG_DATA at 0xcfc-0xcff, any width. The register accessed is the
  address's low byte plus the data port's offset: the specification reserves
  bits 1:0 of the address, but kvm-unit-tests' x86 accessors put a register's
  full byte offset there and always access 0xcfc.
* Bus 0 only, one function (0) per device. A configuration access with the
  enable bit clear, to another bus, or to a device or function that does not
  exist reads all ones and drops writes (a master abort).
* A type 0 header: vendor and device ID, class code and revision (read-only);
  the command register's IO-space, memory-space, bus-master and
  INTx-disable bits; cache line size, latency timer and interrupt line
  (read-write); header type, interrupt pin and BARs as the device declares.
  Status, capabilities, expansion ROM and BIST read 0.
* BARs are 32-bit memory (non-prefetchable) or IO, of a power-of-two size:
  writing all ones reads back the size mask with the type bits. A BAR decodes
  while the command register enables its kind, and only inside the bridge's
  windows, which the machine puts on its buses: IO ports 0xc000-0xcfff and
  memory 0xfe000000-0xfebfffff. An access inside a window that no BAR decodes
  reads all ones and is not listed among the machine's unknown accesses.

Not modelled: other buses and PCI-to-PCI bridges, multi-function devices,
64-bit and prefetchable BARs, expansion ROMs, and the reset control
register at 0xcf9. Capabilities and INTx are the devices' own (:mod:`.edu`
adds its MSI capability and has the machine route its pin).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterator, Sequence

from ..core.errors import InvalidArgument
from .bus import Device

CONFIG_ADDRESS_PORT = 0xCF8
CONFIG_DATA_PORT = 0xCFC
CONFIG_DATA_PORTS = 4
CONFIG_SPACE_SIZE = 256
DEVICES = 32
BAR_COUNT = 6
IO_WINDOW = (0xC000, 0xD000)            # [start, end)
MEMORY_WINDOW = (0xFE000000, 0xFEC00000)    # [start, end): below the IOAPIC
ADDRESS_ENABLE = 1 << 31
ADDRESS_MASK = 0x80FFFFFF               # bits 30:24 are reserved and read 0
MEMORY_BAR_MIN = 16
IO_BAR_MIN = 4


class Register(enum.IntEnum):
    """Offsets in a type 0 configuration header."""

    VENDOR_ID = 0x00
    DEVICE_ID = 0x02
    COMMAND = 0x04
    REVISION = 0x08
    CLASS_CODE = 0x09           # 3 bytes: programming interface, subclass, base class
    CACHE_LINE_SIZE = 0x0C
    LATENCY_TIMER = 0x0D
    BAR0 = 0x10
    INTERRUPT_LINE = 0x3C
    INTERRUPT_PIN = 0x3D


class Command(enum.IntFlag):
    """The command register's bits this model implements."""

    IO = 1 << 0
    MEMORY = 1 << 1
    BUS_MASTER = 1 << 2
    INTX_DISABLE = 1 << 10


class BarKind(enum.IntEnum):
    """A BAR's bit 0: what address space it decodes."""

    MEMORY = 0
    IO = 1


DECODE_BIT = {BarKind.MEMORY: Command.MEMORY, BarKind.IO: Command.IO}
ADDRESS_BITS = {BarKind.MEMORY: ~0xF & 0xFFFFFFFF, BarKind.IO: ~0x3 & 0xFFFFFFFF}


@dataclasses.dataclass(frozen=True)
class Bar:
    """One base address register: its kind and size in bytes (a power of two)."""

    kind: BarKind
    size: int

    def __post_init__(self) -> None:
        if not isinstance(self.kind, BarKind):
            raise InvalidArgument(f"Bar(kind={self.kind!r}): expected BarKind.MEMORY or BarKind.IO")
        least = MEMORY_BAR_MIN if self.kind == BarKind.MEMORY else IO_BAR_MIN
        if not isinstance(self.size, int) or self.size < least or self.size & (self.size - 1) \
                or self.size > 1 << 31:
            raise InvalidArgument(f"Bar(kind={self.kind.name}, size={self.size!r}): the size must be a power of "
                                  f"two from {least} to 2 GiB")


@dataclasses.dataclass(frozen=True)
class Identity:
    """What a function's header says it is."""

    vendor: int
    device: int
    class_code: int             # base class, subclass, programming interface: 0x060000 is a host bridge
    revision: int = 0


HOST_BRIDGE = Identity(0x8086, 0x1237, 0x060000)    # the Intel 440FX host bridge's IDs, as a PC's 00.0
Q35_HOST_BRIDGE = Identity(0x8086, 0x29C0, 0x060000)    # the Intel Q35 (82G33 DRAM controller) host bridge
WRITABLE = {   # register: (width, writable bits)
    Register.COMMAND: (2, int(Command.IO | Command.MEMORY | Command.BUS_MASTER | Command.INTX_DISABLE)),
    Register.CACHE_LINE_SIZE: (1, 0xFF), Register.LATENCY_TIMER: (1, 0xFF), Register.INTERRUPT_LINE: (1, 0xFF)}


class PciFunction:
    """Function 0 of a PCI device: its 256-byte configuration space; subclasses with BARs answer them.

    A subclass declaring ``bars`` implements :meth:`bar_read` and
    :meth:`bar_write` (``offset`` counts from the BAR's address), and may
    override :meth:`decoding_changed`, called after the guest writes the
    command register or a BAR.
    """

    def __init__(self, identity: Identity, bars: Sequence[Bar] = (), interrupt_pin: int = 0) -> None:
        if len(bars) > BAR_COUNT:
            raise InvalidArgument(f"bars: {len(bars)} given; a type 0 header has {BAR_COUNT}")
        self.identity = identity
        self.bars = tuple(bars)
        self.config = bytearray(CONFIG_SPACE_SIZE)
        self._writable = bytearray(CONFIG_SPACE_SIZE)
        self._put(Register.VENDOR_ID, 2, identity.vendor)
        self._put(Register.DEVICE_ID, 2, identity.device)
        self._put(Register.REVISION, 1, identity.revision)
        self._put(Register.CLASS_CODE, 3, identity.class_code)
        self._put(Register.INTERRUPT_PIN, 1, interrupt_pin)
        for register, (width, mask) in WRITABLE.items():
            self._writable[register:register + width] = mask.to_bytes(width, "little")
        for index, bar in enumerate(self.bars):
            offset = Register.BAR0 + 4 * index
            self._put(offset, 4, int(bar.kind))
            self._writable[offset:offset + 4] = (~(bar.size - 1) & 0xFFFFFFFF).to_bytes(4, "little")

    def _put(self, offset: int, size: int, value: int) -> None:
        self.config[offset:offset + size] = value.to_bytes(size, "little")

    def _get(self, offset: int, size: int) -> int:
        return int.from_bytes(self.config[offset:offset + size], "little")

    # -- configuration space ------------------------------------------------------
    def config_read(self, offset: int, size: int) -> int:
        """``size`` bytes at ``offset``; bytes past the 256 read as 0xff."""
        return int.from_bytes(self.config[offset:offset + size].ljust(size, b"\xff"), "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        """Write the writable bits of ``size`` bytes at ``offset``; the rest keep their value."""
        data = value.to_bytes(size, "little")
        touched = False
        for index in range(size):
            position = offset + index
            if position >= CONFIG_SPACE_SIZE or not self._writable[position]:
                continue
            mask = self._writable[position]
            self.config[position] = (self.config[position] & ~mask) | (data[index] & mask)
            touched = touched or Register.COMMAND <= position < Register.REVISION or \
                Register.BAR0 <= position < Register.BAR0 + 4 * BAR_COUNT
        if touched:
            self.decoding_changed()

    def program_bar(self, index: int, address: int) -> None:
        """Set BAR ``index`` to ``address`` (as firmware does) and enable decoding of its kind."""
        bar = self.bars[index]
        self._put(Register.BAR0 + 4 * index, 4, (address & ADDRESS_BITS[bar.kind]) | int(bar.kind))
        self._put(Register.COMMAND, 2, self._get(Register.COMMAND, 2) | DECODE_BIT[bar.kind])

    def bar_address(self, index: int) -> int | None:
        """Where BAR ``index`` decodes now; None while the command register disables its kind."""
        bar = self.bars[index]
        if not self._get(Register.COMMAND, 2) & DECODE_BIT[bar.kind]:
            return None
        return self._get(Register.BAR0 + 4 * index, 4) & ADDRESS_BITS[bar.kind]

    # -- for subclasses -------------------------------------------------------------
    def bar_read(self, index: int, offset: int, size: int) -> int:
        raise NotImplementedError(f"{type(self).__name__} declares BARs and must implement bar_read")

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} declares BARs and must implement bar_write")

    def decoding_changed(self) -> None:
        """The guest wrote the command register or a BAR: BAR addresses or decoding may differ."""


@dataclasses.dataclass(frozen=True)
class Claim:
    """A range the PCI host puts on one of the machine's buses."""

    io: bool                    # the IO bus, else the MMIO bus
    base: int
    length: int
    device: Device
    name: str


class PciHost:
    """Bus 0: the host bridge at device 0, devices added with :meth:`add`, and the decoding of their BARs."""

    def __init__(self, bridge: Identity = HOST_BRIDGE) -> None:
        self.functions: dict[int, PciFunction] = {0: PciFunction(bridge)}
        self.address = 0
        self._next_io = IO_WINDOW[0]
        self._next_memory_top = MEMORY_WINDOW[1]

    def add(self, device: int, function: PciFunction) -> None:
        """Put ``function`` at ``device`` (function 0) of bus 0 and program its BARs inside the windows."""
        if isinstance(device, bool) or not isinstance(device, int) or not 1 <= device < DEVICES:
            raise InvalidArgument(f"device={device!r}: expected a device number 1 to {DEVICES - 1} "
                                  f"(0 is the host bridge)")
        if device in self.functions:
            raise InvalidArgument(f"device={device}: PCI device {device} is already "
                                  f"{type(self.functions[device]).__name__}; choose a free number")
        if not isinstance(function, PciFunction):
            raise InvalidArgument(f"function={function!r}: expected a pykvm.vmm.pci.PciFunction")
        addresses = [self._allocate(bar) for bar in function.bars]
        for index, address in enumerate(addresses):
            function.program_bar(index, address)
        self.functions[device] = function

    def _allocate(self, bar: Bar) -> int:
        if bar.kind == BarKind.IO:
            address = -(-self._next_io // bar.size) * bar.size
            if address + bar.size > IO_WINDOW[1]:
                raise InvalidArgument(f"{bar}: no room left in the IO window {IO_WINDOW[0]:#x}-{IO_WINDOW[1]:#x}")
            self._next_io = address + bar.size
            return address
        address = (self._next_memory_top - bar.size) // bar.size * bar.size
        if address < MEMORY_WINDOW[0]:
            raise InvalidArgument(f"{bar}: no room left in the memory window "
                                  f"{MEMORY_WINDOW[0]:#x}-{MEMORY_WINDOW[1]:#x}")
        self._next_memory_top = address
        return address

    def claims(self) -> Iterator[Claim]:
        """The ports and MMIO ranges to put on the machine's buses."""
        yield Claim(True, CONFIG_ADDRESS_PORT, 1, _ConfigAddress(self), "PCI CONFIG_ADDRESS")
        yield Claim(True, CONFIG_DATA_PORT, CONFIG_DATA_PORTS, _ConfigData(self), "PCI CONFIG_DATA")
        yield Claim(True, IO_WINDOW[0], IO_WINDOW[1] - IO_WINDOW[0], _Window(self, BarKind.IO, IO_WINDOW[0]),
                    "PCI IO window")
        yield Claim(False, MEMORY_WINDOW[0], MEMORY_WINDOW[1] - MEMORY_WINDOW[0],
                    _Window(self, BarKind.MEMORY, MEMORY_WINDOW[0]), "PCI memory window")

    def selected(self) -> tuple[PciFunction, int] | None:
        """The function and register CONFIG_ADDRESS selects, or None (a master abort)."""
        address = self.address
        if not address & ADDRESS_ENABLE or address >> 16 & 0xFF or address >> 8 & 0x7:
            return None
        function = self.functions.get(address >> 11 & 0x1F)
        return None if function is None else (function, address & 0xFF)

    def decode(self, kind: BarKind, address: int) -> tuple[PciFunction, int, int] | None:
        """The function, BAR index and BAR address that decode ``address`` of ``kind``, if any."""
        for function in self.functions.values():
            for index, bar in enumerate(function.bars):
                if bar.kind != kind:
                    continue
                base = function.bar_address(index)
                if base is not None and base <= address < base + bar.size:
                    return function, index, base
        return None


class _ConfigAddress:
    def __init__(self, host: PciHost) -> None:
        self._host = host

    def read(self, offset: int, size: int) -> int:
        return self._host.address if size == 4 else (1 << 8 * size) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        if size == 4:
            self._host.address = value & ADDRESS_MASK


class _ConfigData:
    def __init__(self, host: PciHost) -> None:
        self._host = host

    def read(self, offset: int, size: int) -> int:
        selected = self._host.selected()
        if selected is None:
            return (1 << 8 * size) - 1
        function, register = selected
        return function.config_read(register + offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        selected = self._host.selected()
        if selected is not None:
            function, register = selected
            function.config_write(register + offset, size, value)


class _Window:
    """One of the bridge's windows on a machine bus: hands each access to the BAR that decodes it."""

    def __init__(self, host: PciHost, kind: BarKind, base: int) -> None:
        self._host = host
        self._kind = kind
        self._base = base

    def read(self, offset: int, size: int) -> int:
        found = self._host.decode(self._kind, self._base + offset)
        if found is None:
            return (1 << 8 * size) - 1
        function, index, base = found
        return function.bar_read(index, self._base + offset - base, size)

    def write(self, offset: int, size: int, value: int) -> None:
        found = self._host.decode(self._kind, self._base + offset)
        if found is not None:
            function, index, base = found
            function.bar_write(index, self._base + offset - base, size, value)
