"""ACPI tables built by the VMM: RSDP, RSDT, XSDT, FADT, FACS, DSDT, MADT and HPET (ACPI 6.0 layouts).

Why this exists: kernels find the power-management registers, the reset
register, the CPUs and the interrupt controllers through ACPI (kvm-unit-tests'
``s3`` and ``vmexit inl_from_pmtimer`` read the FADT and FACS). pykvm has no
firmware, so the machine writes the tables into guest memory before the kernel
starts: :func:`build` gives the bytes and where they go. The RSDP (revision 2)
is 16-byte aligned at 0xf0000, inside 0xe0000-0xfffff where a BIOS leaves it and
a kernel searches; the FACS is in the ACPI NVS range and the other tables in the
ACPI reclaim range that :func:`.multiboot.e820_map` lists.

What the tables say:

* FADT: the PM1a event and control blocks (:mod:`.pm1`), the PM timer
  (:mod:`.pm_timer`, 24- or 32-bit, flag TMR_VAL_EXT), the reset register
  (a byte write to the port :mod:`.reset` decodes), the RTC century byte. SCI
  on ISA IRQ 9 (the devices never raise it); no SMI command port, so the
  machine is always in ACPI mode; no GPE blocks, no C2/C3, no 8042 flag (port
  0x64 only resets), no VGA. 32-bit table pointers only (X_FIRMWARE_CTRL and
  X_DSDT zero, as ACPI asks when the 32-bit ones are used); the ``X_`` register
  blocks repeat the 32-bit ones.
* FACS: version 2, no global lock use, no 64-bit waking: the guest's waking
  vector is the real-mode one.
* DSDT: only ``\\_S3_`` and ``\\_S5_``, the SLP_TYP values of the sleep states
  the machine has; no device or processor objects.
* MADT: one enabled local APIC entry per vCPU (its APIC ID), the IOAPIC (ID 0,
  0xfec00000, GSI base 0) and PCAT_COMPAT (the 8259s exist). No interrupt
  source override: KVM's default routing sends ISA IRQ n (the PIT's IRQ 0 too)
  to IOAPIC pin n, which is what ACPI assumes when no override is given.
* HPET: the event timer block's ID and address (:mod:`.hpet`).

Not built: SSDT, SRAT/SLIT, MCFG (no PCIe), DMAR (the VT-d unit of
:mod:`.vtd` is found at its fixed address), x2APIC entries (APIC IDs stay
below 255), NMI entries. Pure Python; a bad description raises
:class:`AcpiError` naming the field.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from collections.abc import Iterable

from ..core.errors import InvalidArgument
from .multiboot import ACPI_NVS, ACPI_TABLES

RSDP_ADDRESS = 0xF0000            # 16-byte aligned in 0xe0000-0xfffff, where kernels search
FACS_ADDRESS = ACPI_NVS[0]        # 64-byte aligned, as ACPI requires
FACS_SIZE = 64
LOCAL_APIC_ADDRESS = 0xFEE00000
IOAPIC_ADDRESS = 0xFEC00000
IOAPIC_ID = 0                     # KVM's IOAPIC ID register after reset
SCI_IRQ = 9
CMOS_CENTURY = 0x32
TABLE_ALIGN = 16
OEM_ID = b"PYKVM "
OEM_TABLE_ID = b"PYKVMPC "
OEM_REVISION = 1
CREATOR_ID = b"PYKV"
CREATOR_REVISION = 1
HYPERVISOR_ID = b"pykvm\0\0\0"
_HEADER = struct.Struct("<4sIBB6s8sI4sI")
_RSDP = struct.Struct("<8sB6sBIIQB3s")
_FACS = struct.Struct("<4sIIIIIQB3sI24s")
_GAS = struct.Struct("<BBBBQ")


class Revision(enum.IntEnum):
    """Table revisions (FACS version) of ACPI 6.0."""

    RSDP = 2
    RSDT = 1
    XSDT = 1
    FADT = 6
    FADT_MINOR = 0
    FACS = 2
    DSDT = 2
    MADT = 4
    HPET = 1


class AddressSpace(enum.IntEnum):
    """Generic Address Structure space IDs."""

    SYSTEM_MEMORY = 0
    SYSTEM_IO = 1


class AccessSize(enum.IntEnum):
    """Generic Address Structure access sizes."""

    UNDEFINED = 0
    BYTE = 1
    WORD = 2
    DWORD = 3
    QWORD = 4


class FadtFlag(enum.IntFlag):
    """FADT Flags bits this machine sets."""

    WBINVD = 1 << 0
    PROC_C1 = 1 << 2
    PWR_BUTTON = 1 << 4           # no fixed-feature power button
    SLP_BUTTON = 1 << 5           # no fixed-feature sleep button
    TMR_VAL_EXT = 1 << 8          # a 32-bit PM timer
    RESET_REG_SUP = 1 << 10


class BootArch(enum.IntFlag):
    """FADT IAPC_BOOT_ARCH bits this machine sets."""

    LEGACY_DEVICES = 1 << 0       # ISA devices (COM1, CMOS, PIT) are there
    VGA_NOT_PRESENT = 1 << 2


class MadtEntry(enum.IntEnum):
    """MADT interrupt controller structure types."""

    LOCAL_APIC = 0
    IO_APIC = 1


class MadtFlag(enum.IntFlag):
    """MADT Flags."""

    PCAT_COMPAT = 1 << 0          # dual 8259s installed


class LocalApicFlag(enum.IntFlag):
    """Processor Local APIC structure flags."""

    ENABLED = 1 << 0              # the processor is usable


class AmlOp(enum.IntEnum):
    """The few AML opcodes the DSDT uses."""

    ZERO = 0x00
    ONE = 0x01
    NAME = 0x08
    BYTE_PREFIX = 0x0A
    PACKAGE = 0x12
    ROOT = 0x5C


class AcpiError(InvalidArgument):
    """A platform description the tables cannot express; the message names the field."""


@dataclasses.dataclass(frozen=True)
class Platform:
    """What the tables describe: the vCPUs' APIC IDs and the devices' addresses.

    ``sleep_states`` pairs each S-state the machine has with its SLP_TYP value,
    e.g. ``((3, 1), (5, 7))``; ``hpet_block_id`` is the low 32 bits of the
    HPET's capabilities register.
    """

    apic_ids: tuple[int, ...]
    pm1_event_port: int
    pm1_control_port: int
    pm_timer_port: int
    pm_timer_bits: int
    reset_port: int
    reset_value: int
    sleep_states: tuple[tuple[int, int], ...]
    hpet_address: int
    hpet_block_id: int

    def __post_init__(self) -> None:
        ids = self.apic_ids
        if not ids or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < 0xFF for i in ids):
            raise AcpiError(f"apic_ids={ids!r}: expected one xAPIC ID (0-254) per vCPU, at least one")
        if len(set(ids)) != len(ids):
            raise AcpiError(f"apic_ids={ids!r}: each vCPU needs its own APIC ID")
        for name in ("pm1_event_port", "pm1_control_port", "pm_timer_port", "reset_port"):
            _check_int(name, getattr(self, name), 0xFFFF, "an IO port")
        _check_int("reset_value", self.reset_value, 0xFF, "a byte")
        if self.pm_timer_bits not in (24, 32):
            raise AcpiError(f"pm_timer_bits={self.pm_timer_bits!r}: an ACPI PM timer has 24 or 32 bits")
        for state, slp_typ in self.sleep_states:
            _check_int("sleep state", state, 5, "S0-S5")
            _check_int(f"SLP_TYP of S{state}", slp_typ, 7, "a 3-bit SLP_TYP value")
        _check_int("hpet_address", self.hpet_address, 0xFFFFFFFFFFFFFFFF, "a physical address")
        _check_int("hpet_block_id", self.hpet_block_id, 0xFFFFFFFF, "the low 32 bits of GCAP_ID")


@dataclasses.dataclass(frozen=True)
class Tables:
    """The built tables: ``writes`` are (guest-physical address, bytes); ``addresses`` by signature."""

    writes: tuple[tuple[int, bytes], ...]
    addresses: dict[str, int]


def _check_int(name: str, value: object, limit: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise AcpiError(f"{name}={value!r}: expected {what}, 0 to {limit:#x}")


def checksum(data: bytes) -> int:
    """The byte that makes ``data`` plus it sum to 0 mod 256."""
    return -sum(data) & 0xFF


def _with_checksum(data: bytes, offset: int) -> bytes:
    """``data`` with the byte at ``offset`` (0 on entry) set so that the whole sums to 0."""
    return data[:offset] + bytes([checksum(data)]) + data[offset + 1:]


def table(signature: bytes, revision: int, body: bytes) -> bytes:
    """A system description table: the 36-byte header (length, checksum) and ``body``."""
    header = _HEADER.pack(signature, _HEADER.size + len(body), revision, 0, OEM_ID, OEM_TABLE_ID,
                          OEM_REVISION, CREATOR_ID, CREATOR_REVISION)
    return _with_checksum(header + body, 9)


def gas(space: AddressSpace, bits: int, access: AccessSize, address: int) -> bytes:
    """A Generic Address Structure (12 bytes); all zeros for address 0 (not present)."""
    if not address:
        return bytes(_GAS.size)
    return _GAS.pack(space, bits, 0, access, address)


def rsdp(rsdt: int, xsdt: int) -> bytes:
    """The revision-2 RSDP (36 bytes): checksum over the first 20, extended checksum over all."""
    data = _RSDP.pack(b"RSD PTR ", 0, OEM_ID, Revision.RSDP, rsdt, _RSDP.size, xsdt, 0, bytes(3))
    return _with_checksum(_with_checksum(data[:20], 8) + data[20:], 32)


def facs() -> bytes:
    """The FACS: waking vectors 0 until the guest writes one, no S4BIOS, no 64-bit wake."""
    return _FACS.pack(b"FACS", FACS_SIZE, 0, 0, 0, 0, 0, Revision.FACS, bytes(3), 0, bytes(24))


def waking_vectors(data: bytes) -> tuple[int, int]:
    """(Firmware_Waking_Vector, X_Firmware_Waking_Vector) from a FACS as read from guest memory."""
    fields = _FACS.unpack(data[:_FACS.size])
    return fields[3], fields[6]


def _aml_integer(value: int) -> bytes:
    if value in (0, 1):
        return bytes([AmlOp.ONE if value else AmlOp.ZERO])
    return bytes([AmlOp.BYTE_PREFIX, value])


def _aml_sleep_package(state: int, slp_typ: int) -> bytes:
    r"""``Name(\_Sx_, Package() {SLP_TYP for PM1a, for PM1b, reserved, reserved})``."""
    elements = b"".join(_aml_integer(value) for value in (slp_typ, slp_typ, 0, 0))
    body = bytes([4]) + elements                      # NumElements, then the elements
    package = bytes([AmlOp.PACKAGE, len(body) + 1]) + body   # a one-byte PkgLength counts itself
    return bytes([AmlOp.NAME, AmlOp.ROOT]) + f"_S{state}_".encode() + package


def dsdt(sleep_states: Iterable[tuple[int, int]]) -> bytes:
    """The DSDT: only the \\_Sx_ packages giving each sleep state's SLP_TYP."""
    return table(b"DSDT", Revision.DSDT, b"".join(_aml_sleep_package(s, t) for s, t in sleep_states))


def fadt(platform: Platform, facs_address: int, dsdt_address: int) -> bytes:
    """The FADT (ACPI 6.0, 276 bytes)."""
    flags = FadtFlag.WBINVD | FadtFlag.PROC_C1 | FadtFlag.PWR_BUTTON | FadtFlag.SLP_BUTTON | FadtFlag.RESET_REG_SUP
    if platform.pm_timer_bits == 32:
        flags |= FadtFlag.TMR_VAL_EXT
    io = AddressSpace.SYSTEM_IO
    body = struct.pack("<IIBBHIBBBB", facs_address, dsdt_address, 0, 0, SCI_IRQ, 0, 0, 0, 0, 0)
    body += struct.pack("<8I", platform.pm1_event_port, 0, platform.pm1_control_port, 0, 0,
                        platform.pm_timer_port, 0, 0)
    body += struct.pack("<8B", 4, 2, 0, 4, 0, 0, 0, 0)     # PM1 event/control, PM timer lengths
    body += struct.pack("<4H", 101, 1001, 0, 0)            # C2, C3 latencies above the limits: none
    body += struct.pack("<5BHBI", 0, 0, 0, 0, CMOS_CENTURY, BootArch.LEGACY_DEVICES | BootArch.VGA_NOT_PRESENT,
                        0, flags)
    body += gas(io, 8, AccessSize.BYTE, platform.reset_port)
    body += struct.pack("<BHBQQ", platform.reset_value, 0, Revision.FADT_MINOR, 0, 0)
    body += gas(io, 32, AccessSize.WORD, platform.pm1_event_port) + bytes(_GAS.size)
    body += gas(io, 16, AccessSize.WORD, platform.pm1_control_port) + bytes(2 * _GAS.size)
    body += gas(io, 32, AccessSize.DWORD, platform.pm_timer_port) + bytes(4 * _GAS.size)
    body += HYPERVISOR_ID
    return table(b"FACP", Revision.FADT, body)


def madt(apic_ids: Iterable[int]) -> bytes:
    """The MADT: the local APIC address, PCAT_COMPAT, one entry per local APIC, the IOAPIC."""
    body = struct.pack("<II", LOCAL_APIC_ADDRESS, MadtFlag.PCAT_COMPAT)
    for uid, apic_id in enumerate(apic_ids):
        body += struct.pack("<BBBBI", MadtEntry.LOCAL_APIC, 8, uid, apic_id, LocalApicFlag.ENABLED)
    body += struct.pack("<BBBBII", MadtEntry.IO_APIC, 12, IOAPIC_ID, 0, IOAPIC_ADDRESS, 0)
    return table(b"APIC", Revision.MADT, body)


def hpet(block_id: int, address: int) -> bytes:
    """The HPET description table: block ID, base address, HPET number 0, no periodic minimum, no protection."""
    body = struct.pack("<I", block_id) + gas(AddressSpace.SYSTEM_MEMORY, 64, AccessSize.UNDEFINED, address)
    body += struct.pack("<BHB", 0, 0, 0)
    return table(b"HPET", Revision.HPET, body)


def build(platform: Platform) -> Tables:
    """Every table, laid out in the ACPI area, and the RSDP at :data:`RSDP_ADDRESS`."""
    start, size = ACPI_TABLES
    writes = [(FACS_ADDRESS, facs())]
    addresses = {"FACS": FACS_ADDRESS}
    cursor = start

    def place(data: bytes) -> int:
        nonlocal cursor
        address = cursor
        cursor += -(-len(data) // TABLE_ALIGN) * TABLE_ALIGN
        if cursor > start + size:
            raise AcpiError(f"the ACPI tables need more than the {size:#x} bytes at {start:#x}; "
                            f"describe fewer vCPUs")
        writes.append((address, data))
        addresses[data[:4].decode()] = address
        return address

    dsdt_address = place(dsdt(platform.sleep_states))
    described = [place(fadt(platform, FACS_ADDRESS, dsdt_address)), place(madt(platform.apic_ids)),
                 place(hpet(platform.hpet_block_id, platform.hpet_address))]
    rsdt_address = place(table(b"RSDT", Revision.RSDT, struct.pack(f"<{len(described)}I", *described)))
    xsdt_address = place(table(b"XSDT", Revision.XSDT, struct.pack(f"<{len(described)}Q", *described)))
    writes.append((RSDP_ADDRESS, rsdp(rsdt_address, xsdt_address)))
    addresses["RSDP"] = RSDP_ADDRESS
    return Tables(tuple(writes), addresses)
