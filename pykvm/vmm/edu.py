"""QEMU's "edu" educational PCI device (1234:11e8), as its specification (QEMU's docs/specs/edu.rst) documents it.

Why this exists: kvm-unit-tests' ``intel_iommu`` entry (``-device edu``) uses
it as the DMA master and interrupt source behind the IOMMU (:mod:`.vtd`): it
copies between guest memory and the device's buffer and raises INTx and MSIs.
``Machine(devices=("pci-testdev", "edu"), chipset="q35")`` puts it at
00:02.0, where QEMU puts it after pci-testdev, so the guest sees the same BDF
and BAR (0xfea00000).

BAR0 is 1 MiB of memory; 4-byte accesses below 0x80, 4 or 8 above:

* 0x00 identification ``0x010000ed`` (version 1.0); 0x04 liveness check (reads
  the inverse of what was written); 0x08 factorial (the stored value's
  factorial, computed at once: status bit 0x01 is never seen set); 0x20 status
  (0x80: raise interrupt 0x1 after a factorial).
* 0x24 interrupt status; 0x60 raise (ORs the value into the status); 0x64
  acknowledge (clears the value's bits).
* 0x80/0x88/0x90 DMA source, destination and count; 0x98 command (0x01 start,
  0x02 from the device to RAM, 0x04 raise interrupt 0x100 when done). The
  device's buffer is 4 KiB at device address 0x40000; RAM addresses are
  masked to the device's 28-bit DMA mask and go through the IOMMU when there
  is one. The copy is done when the command is written, so the guest's poll
  of bit 0x01 ends at once; a copy the IOMMU refuses (or outside the buffer)
  is dropped.

Interrupts: INTx (pin A) is asserted while the interrupt status is non-zero,
unless MSI is enabled; then each raise that leaves a non-zero status sends the
message programmed in the MSI capability (64-bit, one vector, at 0x40).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from typing import Any

from .pci import Bar, BarKind, Identity, PciFunction, Register
from .vtd import DmaFault

IDENTITY = Identity(0x1234, 0x11E8, 0x00FF00)
BARS = (Bar(BarKind.MEMORY, 1 << 20),)
ID_VALUE = 0x010000ED
BUFFER_ADDRESS = 0x40000
BUFFER_SIZE = 4096
DMA_MASK = (1 << 28) - 1
DMA_INTERRUPT = 0x100
FACTORIAL_INTERRUPT = 0x1
FACTORIAL_ZERO_FROM = 34
STATUS_FACTORIAL_INTERRUPT = 0x80
MSI_CAPABILITY = 0x40
MSI_CAPABILITY_ID = 0x05
STATUS_CAPABILITIES = 1 << 4        # status register bit: a capability list exists
CAPABILITIES_POINTER = 0x34
INTERRUPT_PIN_A = 1


class Reg(enum.IntEnum):
    """BAR0 register offsets."""

    ID = 0x00
    ALIVE = 0x04
    FACTORIAL = 0x08
    STATUS = 0x20
    INTR_STATUS = 0x24
    INTR_RAISE = 0x60
    INTR_ACK = 0x64
    DMA_SRC = 0x80
    DMA_DST = 0x88
    DMA_COUNT = 0x90
    DMA_CMD = 0x98


class DmaCommand(enum.IntFlag):
    START = 0x01
    FROM_DEVICE = 0x02
    INTERRUPT = 0x04


class Msi(enum.IntEnum):
    """Offsets in the MSI capability (PCI Local Bus Specification 6.8.1), 64-bit layout."""

    CONTROL = 2
    ADDRESS_LO = 4
    ADDRESS_HI = 8
    DATA = 12


MSI_ENABLE, MSI_64BIT = 1 << 0, 1 << 7


class Edu(PciFunction):
    """The device.

    ``dma(address, size, write)`` gives the guest-physical pieces of a device
    access (raising to refuse it), ``memory()`` the guest memory (None before
    the VM exists), ``intx(line, level)`` sets the INTx line (``line``: the
    interrupt line register, which the machine programs as firmware would),
    ``msi(address, data)`` sends a message; the machine routes DMA and both
    kinds of interrupt through the IOMMU.
    """

    def __init__(self, memory: Callable[[], Any], dma: Callable[[int, int, bool], list[tuple[int, int]]],
                 intx: Callable[[int, int], None], msi: Callable[[int, int], None], interrupt_line: int) -> None:
        super().__init__(IDENTITY, BARS, interrupt_pin=INTERRUPT_PIN_A)
        self._memory, self._dma, self._intx, self._msi = memory, dma, intx, msi
        self._put(Register.INTERRUPT_LINE, 1, interrupt_line)
        self._put(0x06, 2, STATUS_CAPABILITIES)
        self._put(CAPABILITIES_POINTER, 1, MSI_CAPABILITY)
        self._put(MSI_CAPABILITY, 1, MSI_CAPABILITY_ID)
        self._put(MSI_CAPABILITY + Msi.CONTROL, 2, MSI_64BIT)
        for offset, mask in ((Msi.CONTROL, 0x0001), (Msi.ADDRESS_LO, 0xFFFFFFFC), (Msi.ADDRESS_HI, 0xFFFFFFFF),
                             (Msi.DATA, 0xFFFF)):
            width = 2 if mask <= 0xFFFF else 4
            self._writable[MSI_CAPABILITY + offset:MSI_CAPABILITY + offset + width] = mask.to_bytes(width, "little")
        self.registers: dict[int, int] = dict.fromkeys((Reg.ALIVE, Reg.FACTORIAL, Reg.STATUS, Reg.INTR_STATUS,
                                                        Reg.DMA_SRC, Reg.DMA_DST, Reg.DMA_COUNT, Reg.DMA_CMD), 0)
        self.buffer = bytearray(BUFFER_SIZE)
        self._line = 0

    @property
    def msi_enabled(self) -> bool:
        return bool(self._get(MSI_CAPABILITY + Msi.CONTROL, 2) & MSI_ENABLE)

    def bar_read(self, index: int, offset: int, size: int) -> int:
        if offset == Reg.ID:
            return ID_VALUE
        if offset == Reg.ALIVE:
            return ~self.registers[Reg.ALIVE] & 0xFFFFFFFF
        base = offset & ~7 if offset >= Reg.DMA_SRC else offset
        value = self.registers.get(base, 0)
        return value >> 8 * (offset - base) & ((1 << 8 * size) - 1)

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        if offset >= Reg.DMA_SRC and offset & ~7 in (Reg.DMA_SRC, Reg.DMA_DST, Reg.DMA_COUNT):
            base = offset & ~7
            shift, mask = 8 * (offset - base), (1 << 8 * size) - 1
            register = Reg(base)
            self.registers[register] = (self.registers[register] & ~(mask << shift)) | (value & mask) << shift
        elif offset in (Reg.ALIVE, Reg.FACTORIAL):
            self.registers[Reg(offset)] = value & 0xFFFFFFFF
            if offset == Reg.FACTORIAL:
                self._factorial()
        elif offset == Reg.STATUS:
            self.registers[Reg.STATUS] = value & STATUS_FACTORIAL_INTERRUPT   # 0x01 (computing) is read-only
        elif offset == Reg.INTR_RAISE:
            self.raise_interrupt(value)
        elif offset == Reg.INTR_ACK:
            self.registers[Reg.INTR_STATUS] &= ~value
            self._update_intx()
        elif offset == Reg.DMA_CMD:
            self.registers[Reg.DMA_CMD] = value & 0xFFFFFFFF
            if value & DmaCommand.START:
                self._transfer()

    def config_write(self, offset: int, size: int, value: int) -> None:
        super().config_write(offset, size, value)
        self._update_intx()                         # enabling MSI lowers INTx

    # -- behaviour ---------------------------------------------------------------------
    def raise_interrupt(self, value: int) -> None:
        self.registers[Reg.INTR_STATUS] |= value & 0xFFFFFFFF
        if self.msi_enabled:
            if self.registers[Reg.INTR_STATUS]:
                address = self._get(MSI_CAPABILITY + Msi.ADDRESS_LO, 4) | \
                    self._get(MSI_CAPABILITY + Msi.ADDRESS_HI, 4) << 32
                self._msi(address, self._get(MSI_CAPABILITY + Msi.DATA, 2))
        else:
            self._update_intx()

    def _update_intx(self) -> None:
        level = int(bool(self.registers[Reg.INTR_STATUS]) and not self.msi_enabled)
        if level != self._line:
            self._line = level
            self._intx(self.config[Register.INTERRUPT_LINE], level)

    def _factorial(self) -> None:
        value = self.registers[Reg.FACTORIAL]
        # in 32 bits, as the register holds it: from 34! on, 2**32 divides the factorial
        self.registers[Reg.FACTORIAL] = math.factorial(value) & 0xFFFFFFFF if value < FACTORIAL_ZERO_FROM else 0
        if self.registers[Reg.STATUS] & STATUS_FACTORIAL_INTERRUPT:
            self.raise_interrupt(FACTORIAL_INTERRUPT)

    def _transfer(self) -> None:
        command = DmaCommand(self.registers[Reg.DMA_CMD] & 7)
        count = self.registers[Reg.DMA_COUNT]
        to_ram = bool(command & DmaCommand.FROM_DEVICE)
        device_address = self.registers[Reg.DMA_SRC] if to_ram else self.registers[Reg.DMA_DST]
        ram_address = (self.registers[Reg.DMA_DST] if to_ram else self.registers[Reg.DMA_SRC]) & DMA_MASK
        start = device_address - BUFFER_ADDRESS
        memory = self._memory()
        if 0 <= start and start + count <= BUFFER_SIZE and memory is not None:
            try:
                pieces = self._dma(ram_address, count, to_ram)
            except DmaFault:        # the IOMMU refused the access (and recorded the fault)
                pieces = []
            for address, length in pieces:
                if to_ram:
                    memory.write(address, bytes(self.buffer[start:start + length]))
                else:
                    self.buffer[start:start + length] = memory.read(address, length)
                start += length
        self.registers[Reg.DMA_CMD] &= ~DmaCommand.START
        if command & DmaCommand.INTERRUPT:
            self.raise_interrupt(DMA_INTERRUPT)
