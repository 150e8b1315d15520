"""The PC's ways to reset the machine: port 0x92 bit 0, the reset control register 0xcf9, the 8042's pulse command.

Why this exists: kernels reboot through these (kvm-unit-tests' ``init`` tries
each in turn; the FADT's reset register, :mod:`.acpi`, names 0xcf9). pykvm has
no firmware to reboot through, so each device calls ``on_reset(reason)`` and
the machine ends the run (``Ending.RESET``, status 0), as QEMU does under
kvm-unit-tests, which runs it with ``-no-reboot``.

* Port 0x92, System Control Port A: a write setting bit 0 (FAST_RESET) when it
  was clear resets. Bit 1 (the A20 gate) is kept but gates nothing: KVM does
  not mask A20. Reads give the byte last written, 0x02 at first (A20 on).
* Port 0xcf9, the Reset Control Register (one byte): SYS_RST (bit 1) and
  FULL_RST (bit 3) are kept; RST_CPU (bit 2) going from 0 to 1 resets, hard if
  SYS_RST or FULL_RST is set, soft otherwise. It shares its dword with the PCI
  CONFIG_ADDRESS register: a PCI host bridge must claim only port 0xcf8 (a
  4-byte access at 0xcf8 reaches it whole), leaving this byte port free.
* Port 0x64, the 8042's command and status port: status reads SYSTEM_FLAG with
  both buffers empty; a pulse command (0xf0-0xff) whose bit 0 is clear pulses
  the CPU reset line (0xfe is the usual one). Other commands are ignored: the
  data port 0x60, the keyboard and the output-port commands (0xd0/0xd1) are
  not modelled.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

PORT_92 = 0x92
RESET_CONTROL_PORT = 0xCF9
KBC_COMMAND_PORT = 0x64


class Port92(enum.IntFlag):
    FAST_RESET = 1 << 0
    A20 = 1 << 1


class ResetControlBit(enum.IntFlag):
    SYS_RST = 1 << 1
    RST_CPU = 1 << 2
    FULL_RST = 1 << 3


ACPI_VALUE = ResetControlBit.SYS_RST | ResetControlBit.RST_CPU    # the FADT's RESET_VALUE for 0xcf9


class KbcStatus(enum.IntFlag):
    SYSTEM_FLAG = 1 << 2


class KbcCommand(enum.IntEnum):
    PULSE_FIRST = 0xF0          # 0xf0-0xff pulse the output lines whose mask bits (3:0) are clear
    RESET_LINE = 1 << 0         # output line 0 is the CPU reset


OnReset = Callable[[str], None]


class SystemControlA:
    """Port 0x92."""

    def __init__(self, on_reset: OnReset) -> None:
        self._on_reset = on_reset
        self.value: int = Port92.A20

    def read(self, offset: int, size: int) -> int:
        return self.value

    def write(self, offset: int, size: int, value: int) -> None:
        rising = value & ~self.value & Port92.FAST_RESET
        self.value = value & 0xFF
        if rising:
            self._on_reset("port 0x92 bit 0 (fast reset)")


class ResetControl:
    """Port 0xcf9."""

    def __init__(self, on_reset: OnReset) -> None:
        self._on_reset = on_reset
        self.value = 0

    def read(self, offset: int, size: int) -> int:
        return self.value

    def write(self, offset: int, size: int, value: int) -> None:
        rising = value & ~self.value & ResetControlBit.RST_CPU
        self.value = value & (ResetControlBit.SYS_RST | ResetControlBit.FULL_RST)
        if rising:
            hard = value & (ResetControlBit.SYS_RST | ResetControlBit.FULL_RST)
            self._on_reset(f"port 0xcf9 ({'hard' if hard else 'soft'} reset, {value & 0xFF:#04x} written)")


class KeyboardController:
    """Port 0x64: the status register and the pulse commands."""

    def __init__(self, on_reset: OnReset) -> None:
        self._on_reset = on_reset

    def read(self, offset: int, size: int) -> int:
        return KbcStatus.SYSTEM_FLAG

    def write(self, offset: int, size: int, value: int) -> None:
        command = value & 0xFF
        if command >= KbcCommand.PULSE_FIRST and not command & KbcCommand.RESET_LINE:
            self._on_reset(f"port 0x64 command {command:#04x} (keyboard controller reset)")
