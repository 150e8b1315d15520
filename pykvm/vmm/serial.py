"""A 16550A UART (COM1 at 0x3f8-0x3ff, IRQ 4), like kvmtool's hw/serial.c.

Why this exists: the serial port is how a kernel talks. Transmit is instant:
THR writes go straight to ``output`` and LSR always shows THRE and TEMT, so a
polling driver never waits. The divisor latch, IER, IIR/FCR, LCR, MCR (with
loopback, which Linux probes), MSR and the scratch register behave as on the
chip; received bytes (``receive()``, fed from a terminal by the machine) set
LSR.DR and, with IER bit 0, raise the interrupt line through ``set_irq``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

COM1 = 0x3F8
COM1_IRQ = 4
PORTS = 8
LSR_DR, LSR_THRE, LSR_TEMT = 0x01, 0x20, 0x40
IER_RDI, IER_THRI = 0x01, 0x02
IIR_NONE, IIR_THRI, IIR_RDI, IIR_FIFO = 0x01, 0x02, 0x04, 0xC0
LCR_DLAB = 0x80
MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOP = 0x01, 0x02, 0x04, 0x08, 0x10
MSR_CTS, MSR_DSR, MSR_RI, MSR_DCD = 0x10, 0x20, 0x40, 0x80
FIFO_SIZE = 64


class Uart16550:
    """One UART. ``output(bytes)`` receives what the guest transmits; ``set_irq(level)`` drives its IRQ."""

    def __init__(self, output: Callable[[bytes], None], set_irq: Callable[[int], None] | None = None) -> None:
        self._output = output
        self._set_irq = set_irq
        self.rx: deque[int] = deque()
        self.dll, self.dlm = 0x0C, 0     # 9600 baud
        self.ier = 0
        self.lcr = 0x03                  # 8N1
        self.mcr = MCR_OUT2
        self.scr = 0
        self.fcr = 0
        self.thri_pending = False
        self._irq_level = 0

    # -- the bus interface ------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        value = self._read(offset & 7)
        self._update_irq()
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        self._write(offset & 7, value & 0xFF)
        self._update_irq()

    def _read(self, register: int) -> int:
        dlab = self.lcr & LCR_DLAB
        if register == 0:
            if dlab:
                return self.dll
            return self.rx.popleft() if self.rx else 0
        if register == 1:
            return self.dlm if dlab else self.ier
        if register == 2:
            iir = self._iir()
            if iir == IIR_THRI:
                self.thri_pending = False     # reading IIR acknowledges THRE
            return iir | (IIR_FIFO if self.fcr & 1 else 0)
        if register == 3:
            return self.lcr
        if register == 4:
            return self.mcr
        if register == 5:
            return LSR_THRE | LSR_TEMT | (LSR_DR if self.rx else 0)
        if register == 6:
            if self.mcr & MCR_LOOP:
                mcr = self.mcr
                return ((MSR_CTS if mcr & MCR_RTS else 0) | (MSR_DSR if mcr & MCR_DTR else 0)
                        | (MSR_RI if mcr & MCR_OUT1 else 0) | (MSR_DCD if mcr & MCR_OUT2 else 0))
            return MSR_DCD | MSR_DSR | MSR_CTS
        return self.scr

    def _write(self, register: int, value: int) -> None:
        dlab = self.lcr & LCR_DLAB
        if register == 0:
            if dlab:
                self.dll = value
            elif self.mcr & MCR_LOOP:
                self._push(bytes((value,)))
                self.thri_pending = True
            else:
                self._output(bytes((value,)))
                self.thri_pending = True
        elif register == 1:
            if dlab:
                self.dlm = value
            else:
                if value & IER_THRI and not self.ier & IER_THRI:
                    self.thri_pending = True      # enabling THRI with THR empty interrupts at once
                self.ier = value & 0x0F
        elif register == 2:
            self.fcr = value & 0xC9
            if value & 0x02:
                self.rx.clear()
        elif register == 3:
            self.lcr = value
        elif register == 4:
            self.mcr = value & 0x1F
        elif register == 7:
            self.scr = value

    def _iir(self) -> int:
        if self.ier & IER_RDI and self.rx:
            return IIR_RDI
        if self.ier & IER_THRI and self.thri_pending:
            return IIR_THRI
        return IIR_NONE

    def _update_irq(self) -> None:
        level = int(self._iir() != IIR_NONE and bool(self.mcr & MCR_OUT2))
        if level != self._irq_level:
            self._irq_level = level
            if self._set_irq is not None:
                self._set_irq(level)

    # -- input ------------------------------------------------------------------
    def _push(self, data: bytes) -> None:
        room = FIFO_SIZE - len(self.rx)
        self.rx.extend(data[:max(room, 0)])

    def receive(self, data: bytes) -> None:
        """Bytes arriving on the line (dropped beyond the 64-byte FIFO, as on the chip)."""
        self._push(data)
        self._update_irq()

    @property
    def rx_room(self) -> int:
        return FIFO_SIZE - len(self.rx)
