"""The ACPI PM1a event block (PM1_STS, PM1_EN) and control block (PM1_CNT): sleep requests and wake status.

Why this exists: an ACPI kernel enters a sleep state by writing SLP_TYP and
SLP_EN to PM1_CNT (kvm-unit-tests' ``s3`` writes 0x2400: SLP_TYP 1 with SLP_EN)
and learns from PM1_STS why it woke. The FADT (:mod:`.acpi`) gives the blocks'
ports and the DSDT each sleep state's SLP_TYP (:class:`SleepType`).

Registers, 16 bits each (any access width and offset within the 6 bytes works;
the event block is at +0, the control block at +4):

* PM1_STS: WAK_STS and RTC_STS, set by :meth:`Pm1.wake` when the machine wakes
  from S3 on the RTC alarm; writing 1 clears a bit.
* PM1_EN: the enable bits are kept; RTC_EN makes the RTC alarm a wake event,
  the others have no effect.
* PM1_CNT: SCI_EN reads 1 (there is no SMI command port: the machine is always
  in ACPI mode); BM_RLD and SLP_TYP are kept; a write with SLP_EN (which reads
  0) and the SLP_TYP of S3 or S5 calls ``on_sleep``; other SLP_TYP values do
  nothing, as no \\_Sx_ object gives them.

What a sleep does to the machine is the machine's (:class:`~pykvm.vmm.Machine`):
S5 ends the run as a power-off; S3 stops every vCPU, waits for the wake event
and resumes with :func:`resume_cpus`, which does what firmware does on an S3
wake. With no wake event enabled the machine sleeps until the run's timeout,
as a PC sleeps until its power button. Not modelled: the SCI (never raised),
TMR_STS, the power and sleep buttons, GBL_RLS, PM1b blocks.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence

from ..core.constants import MpState

EVENT_PORT = 0x600
CONTROL_PORT = 0x604
PORTS = 6                                 # the 4-byte event block and the 2-byte control block
REAL_MODE_LIMIT = 0x100000                # a real-mode CS:IP reaches below 1 MiB


class SleepType(enum.IntEnum):
    """SLP_TYP values of the sleep states the machine has (the DSDT's \\_S3_ and \\_S5_)."""

    S3 = 1
    S5 = 7


class Status(enum.IntFlag):
    """PM1_STS bits the machine sets."""

    RTC_STS = 1 << 10
    WAK_STS = 1 << 15


class Enable(enum.IntFlag):
    """PM1_EN bits (all kept; RTC_EN acts)."""

    TMR_EN = 1 << 0
    GBL_EN = 1 << 5
    PWRBTN_EN = 1 << 8
    SLPBTN_EN = 1 << 9
    RTC_EN = 1 << 10


class Control(enum.IntFlag):
    """PM1_CNT bits."""

    SCI_EN = 1 << 0
    BM_RLD = 1 << 1
    SLP_TYP = 7 << 10
    SLP_EN = 1 << 13


class Register(enum.IntEnum):
    """The 16-bit registers by index (offset // 2); index 3 is the gap between the blocks."""

    STATUS = 0
    ENABLE = 1
    CONTROL = 2


SLP_TYP_SHIFT = 10
ENABLE_BITS = Enable.TMR_EN | Enable.GBL_EN | Enable.PWRBTN_EN | Enable.SLPBTN_EN | Enable.RTC_EN


class Pm1:
    """PM1_STS, PM1_EN and PM1_CNT; ``on_sleep(SleepType)`` is called for an S3 or S5 request."""

    def __init__(self, on_sleep: Callable[[SleepType], None]) -> None:
        self._on_sleep = on_sleep
        self.status = 0
        self.enable = 0
        self.control = 0

    @property
    def rtc_wake(self) -> bool:
        """Whether the RTC alarm wakes the machine (RTC_EN)."""
        return bool(self.enable & Enable.RTC_EN)

    def wake(self, rtc: bool) -> None:
        """The machine woke (``rtc``: on the RTC alarm): WAK_STS, and RTC_STS if so."""
        self.status |= Status.WAK_STS | (Status.RTC_STS if rtc else 0)

    def _register(self, index: int) -> int:
        if index == Register.STATUS:
            return self.status
        if index == Register.ENABLE:
            return self.enable
        if index == Register.CONTROL:
            return self.control | Control.SCI_EN
        return 0xFFFF                                  # the gap reads as an empty bus

    def _write_register(self, index: int, value: int, mask: int) -> None:
        if index == Register.STATUS:
            self.status &= ~(value & mask)
        elif index == Register.ENABLE:
            self.enable = (self.enable & ~mask | value & mask) & ENABLE_BITS
        elif index == Register.CONTROL:
            self.control = (self.control & ~mask | value & mask) & (Control.BM_RLD | Control.SLP_TYP)
            if value & mask & Control.SLP_EN:
                self._sleep(self.control >> SLP_TYP_SHIFT & 7)

    def _sleep(self, slp_typ: int) -> None:
        if slp_typ in set(SleepType):
            self._on_sleep(SleepType(slp_typ))

    def read(self, offset: int, size: int) -> int:
        value = 0
        for index, byte in enumerate(range(offset, offset + size)):
            value |= (self._register(byte // 2) >> 8 * (byte % 2) & 0xFF) << 8 * index
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        for index in range(offset // 2, (offset + size - 1) // 2 + 1):
            bits = mask = 0
            for half in (0, 1):
                position = 2 * index + half - offset        # this byte's place in the access
                if 0 <= position < size:
                    bits |= (value >> 8 * position & 0xFF) << 8 * half
                    mask |= 0xFF << 8 * half
            self._write_register(index, bits, mask)


def waking_problem(vector: int, x_vector: int) -> str | None:
    """Why the FACS's waking vectors cannot be honoured (None if the real-mode vector can)."""
    if x_vector:
        return (f"the FACS's X_Firmware_Waking_Vector is {x_vector:#x}; only the real-mode "
                f"Firmware_Waking_Vector is modelled (the FACS offers no 64-bit wake)")
    if not vector:
        return "the FACS's Firmware_Waking_Vector is 0: a PC would boot afresh, and there is no firmware"
    if vector >= REAL_MODE_LIMIT:
        return f"the FACS's Firmware_Waking_Vector {vector:#x} is above 1 MiB, out of real mode's reach"
    return None


def resume_cpus(vcpus: Sequence, vector: int) -> None:
    """What firmware does on an S3 wake: the BSP in real mode at ``vector`` (CS = vector >> 4,
    IP = vector & 0xf, data segments 0, interrupts off), every AP in real mode waiting for a SIPI.

    The LAPICs and the rest of the in-kernel irqchip keep their state (on a PC they are reset).
    """
    from ..x86.modes import enter_real_mode  # here: a boot that never sleeps skips the x86 layer's imports

    bsp, *aps = vcpus
    enter_real_mode(bsp, ip=vector & 0xF, cs=vector >> 4)
    for ap in aps:
        enter_real_mode(ap, ip=0, cs=0)
        ap.mp_state = MpState.INIT_RECEIVED
