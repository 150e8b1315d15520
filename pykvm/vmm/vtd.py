"""An Intel VT-d IOMMU (QEMU's ``-device intel-iommu``): DMA remapping and interrupt remapping.

Why this exists: kvm-unit-tests' ``intel_iommu`` entry programs a VT-d
remapping unit at 0xfed90000 (where QEMU's q35 machine puts it), maps a page
for the edu device (:mod:`.edu`) through second-level page tables, lets the
device copy through them, and sends the device's interrupts through interrupt
remapping table entries. Written from the Intel Virtualization Technology for
Directed I/O Architecture Specification (chapters 3, 5, 6, 9 and 11).

What is modelled:

* Registers (chapter 11): VER 1.0; CAP with 16-bit domain IDs, a 39-bit
  adjusted guest address width (3-level tables) and 2 MiB and 1 GiB pages;
  ECAP with queued invalidation and interrupt remapping (``intremap``), no
  extended interrupt mode (xAPIC destinations), no pass-through, no device
  TLBs. GCMD/GSTS: translation enable, root table pointer, interrupt remapping
  enable and table pointer, queued invalidation enable, compatibility format
  interrupts. The one-shot commands latch RTADDR and IRTA.
* DMA remapping in legacy mode: root table -> context entry -> 3-level
  second-level page tables, with read/write permission at every level. With
  translation off, a device address is a guest-physical address.
* Interrupt remapping: MSIs (and IOAPIC messages, :meth:`Vtd.remap_ioapic`) in
  remappable format name an interrupt remapping table entry, whose vector,
  destination (xAPIC: bits 15:8 of its destination field), destination mode,
  delivery mode and trigger mode make the message delivered. Source-ID
  validation applies to MSIs; the IOAPIC's messages carry no requester ID
  (as QEMU's IOAPIC sends them), so an entry's SVT does not apply to them.
  Compatibility-format interrupts pass through while GSTS.CFIS is set and are
  blocked otherwise.
* Faults: one fault recording register; a DMA that a present context entry
  with FPD set does not translate is aborted without a record. The fault event
  interrupt is sent when FECTL.IM is clear.
* Invalidation: there is no cache (every access walks the tables in guest
  memory), so context-cache and IOTLB invalidations (register-based and queued)
  complete at once; the invalidation queue executes invalidation wait
  descriptors (status write, ICS.IWC).

Not modelled: the ACPI DMAR table (the guest finds the unit at its fixed
address), scalable mode and first-level tables, posted interrupts, extended
interrupt mode, advanced fault logging, protected memory regions, page
requests, 256-bit queue descriptors.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from collections.abc import Callable
from typing import Any

from ..core.errors import InvalidMsi
from ..core.interrupts import DeliveryMode, MsiMessage

BASE = 0xFED90000               # where QEMU's q35 machine puts the remapping unit
SIZE = 0x1000
VERSION = 0x10                  # major 1, minor 0
PAGE = 0x1000
ADDRESS_WIDTH = 39              # 3-level second-level tables
LEVELS = 3
FAULT_RECORD = 0x220            # CAP.FRO * 16
IOTLB_BASE = 0x200              # ECAP.IRO * 16: IVA, then the IOTLB register
ADDRESS_BITS = ((1 << 52) - 1) & ~(PAGE - 1)


class Reg(enum.IntEnum):
    """Register offsets (VT-d specification 11.4)."""

    VER = 0x00
    CAP = 0x08
    ECAP = 0x10
    GCMD = 0x18
    GSTS = 0x1C
    RTADDR = 0x20
    CCMD = 0x28
    FSTS = 0x34
    FECTL = 0x38
    FEDATA = 0x3C
    FEADDR = 0x40
    FEUADDR = 0x44
    IQH = 0x80
    IQT = 0x88
    IQA = 0x90
    ICS = 0x9C
    IECTL = 0xA0
    IEDATA = 0xA4
    IEADDR = 0xA8
    IEUADDR = 0xAC
    IRTA = 0xB8
    IVA = IOTLB_BASE
    IOTLB = IOTLB_BASE + 8
    FRCD = FAULT_RECORD


class Global(enum.IntFlag):
    """GCMD commands and their GSTS status bits (the same positions)."""

    CFI = 1 << 23               # compatibility format interrupts pass through
    SIRTP = 1 << 24             # set interrupt remapping table pointer (one-shot)
    IRE = 1 << 25
    QIE = 1 << 26
    WBF = 1 << 27
    EAFL = 1 << 28
    SFL = 1 << 29
    SRTP = 1 << 30              # set root table pointer (one-shot)
    TE = 1 << 31


class FaultReason(enum.IntEnum):
    """Fault reasons of the specification's table of DMA and interrupt remapping faults."""

    ROOT_NOT_PRESENT = 0x1
    CONTEXT_NOT_PRESENT = 0x2
    INVALID_CONTEXT = 0x3
    BEYOND_ADDRESS_WIDTH = 0x4
    WRITE_DENIED = 0x5
    READ_DENIED = 0x6
    TABLE_UNREADABLE = 0x7
    IR_INDEX_TOO_LARGE = 0x21
    IR_NOT_PRESENT = 0x22
    IR_ENTRY_UNREADABLE = 0x23
    IR_RESERVED_ENTRY = 0x24
    IR_COMPATIBILITY_BLOCKED = 0x25
    IR_SOURCE_ID = 0x26


FSTS_PFO, FSTS_PPF, FSTS_IQE = 1 << 0, 1 << 1, 1 << 4
FECTL_IM, FECTL_IP = 1 << 31, 1 << 30
ICS_IWC = 1
CCMD_ICC, IOTLB_IVT = 1 << 63, 1 << 63
PTE_READ, PTE_WRITE, PTE_LARGE = 1 << 0, 1 << 1, 1 << 7
MSI_REMAPPABLE, MSI_SHV = 1 << 4, 1 << 3
DESCRIPTOR = struct.Struct("<QQ")
QUADWORDS = frozenset((Reg.RTADDR, Reg.CCMD, Reg.IQT, Reg.IQA, Reg.IRTA, Reg.IVA, Reg.IOTLB))
PLAIN = frozenset((Reg.RTADDR, Reg.IQA, Reg.IRTA, Reg.IVA, Reg.FEDATA, Reg.FEADDR, Reg.FEUADDR, Reg.IEDATA,
                   Reg.IEADDR, Reg.IEUADDR))     # registers whose writes only store the value


def capabilities(huge_pages: bool = True) -> int:
    """CAP: 16-bit domain IDs (ND=6), SAGAW 39-bit, MGAW 39, FRO, 2 MiB/1 GiB pages, one fault record."""
    cap = 6 | 1 << (8 + 1) | (ADDRESS_WIDTH - 1) << 16 | (FAULT_RECORD // 16) << 24
    return cap | (0b11 << 34 if huge_pages else 0)


def extended_capabilities(intremap: bool) -> int:
    """ECAP: queued invalidation, interrupt remapping if ``intremap``, the IOTLB registers' offset."""
    return 1 << 1 | int(intremap) << 3 | (IOTLB_BASE // 16) << 8


class DmaFault(Exception):
    """A device access the IOMMU did not translate: the reason, and whether to record it."""

    def __init__(self, reason: FaultReason, record: bool = True) -> None:
        super().__init__(f"DMA remapping fault {reason.name} ({reason:#x})")
        self.reason = reason
        self.record = record


@dataclasses.dataclass(frozen=True)
class Irte:
    """One interrupt remapping table entry (128 bits), the fields xAPIC mode uses."""

    present: bool
    fault_disable: bool
    logical: bool
    redirection_hint: bool
    level_triggered: bool
    delivery_mode: int
    posted: bool
    vector: int
    destination: int            # the 32-bit field; xAPIC uses bits 15:8
    source_id: int
    source_qualifier: int
    source_validation: int

    @classmethod
    def from_bytes(cls, raw: bytes) -> Irte:
        low, high = DESCRIPTOR.unpack(raw)
        return cls(bool(low & 1), bool(low >> 1 & 1), bool(low >> 2 & 1), bool(low >> 3 & 1), bool(low >> 4 & 1),
                   low >> 5 & 7, bool(low >> 15 & 1), low >> 16 & 0xFF, low >> 32, high & 0xFFFF,
                   high >> 16 & 3, high >> 18 & 3)

    def accepts(self, source_id: int) -> bool:
        """Source-ID validation (SVT): whether a request from ``source_id`` may use this entry."""
        if self.source_validation == 0:
            return True
        if self.source_validation == 1:
            ignored = (0, 0b100, 0b110, 0b111)[self.source_qualifier]   # function bits SQ masks out
            return (source_id | ignored) == (self.source_id | ignored)
        if self.source_validation == 2:
            return self.source_id >> 8 <= source_id >> 8 <= self.source_id & 0xFF
        return False

    def message(self) -> MsiMessage | None:
        """The compatibility-format MSI this entry makes, or None for a delivery mode an MSI cannot carry."""
        if self.delivery_mode not in set(DeliveryMode):
            return None
        try:
            return MsiMessage.compose(self.destination >> 8 & 0xFF, self.vector, DeliveryMode(self.delivery_mode),
                                      self.logical, self.redirection_hint, self.level_triggered)
        except InvalidMsi:          # e.g. a fixed interrupt with vector 0-15
            return None


class Vtd:
    """The remapping unit: MMIO registers at :data:`BASE`, and the translations devices ask of it.

    ``memory()`` gives the guest's memory (an object with ``read(gpa, size)``
    and ``write(gpa, data)``; None before the VM exists); ``deliver(message)``
    sends a compatibility-format MSI to the LAPICs (``KVM_SIGNAL_MSI``).
    """

    def __init__(self, memory: Callable[[], Any], deliver: Callable[[MsiMessage], object],
                 intremap: bool = True) -> None:
        self._memory = memory
        self._deliver = deliver
        self.intremap = intremap
        self.regs = bytearray(SIZE)
        self._put(Reg.VER, 4, VERSION)
        self._put(Reg.CAP, 8, capabilities())
        self._put(Reg.ECAP, 8, extended_capabilities(intremap))
        self._put(Reg.FECTL, 4, FECTL_IM)
        self._put(Reg.IECTL, 4, FECTL_IM)
        self.root_table = 0
        self.irt_base = 0
        self.irt_entries = 0

    def _put(self, offset: int, size: int, value: int) -> None:
        self.regs[offset:offset + size] = (value & ((1 << 8 * size) - 1)).to_bytes(size, "little")

    def _get(self, offset: int, size: int) -> int:
        return int.from_bytes(self.regs[offset:offset + size], "little")

    @property
    def status(self) -> Global:
        return Global(self._get(Reg.GSTS, 4))

    # -- registers ----------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset == Reg.GCMD:
            return 0                                # write-only
        return self._get(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        register = offset & ~7 if offset & ~7 in QUADWORDS else offset     # either half of a 64-bit register
        if register in PLAIN:
            self._put(offset, size, value)
        elif register == Reg.GCMD:
            self._command(Global(value & 0xFFFFFFFF & ~0x7FFFFF))
        elif register == Reg.CCMD:
            self._put(offset, size, value)
            self._complete(Reg.CCMD, CCMD_ICC, 61, 59)
        elif register == Reg.IOTLB:
            self._put(offset, size, value)
            self._complete(Reg.IOTLB, IOTLB_IVT, 60, 57)
        elif register == Reg.IQT:
            self._put(offset, size, value)
            self._run_queue()
        elif register == Reg.FSTS:
            self._put(offset, 4, self._get(Reg.FSTS, 4) & ~(value & (FSTS_PFO | FSTS_IQE)))
        elif register == Reg.ICS:
            self._put(offset, 4, self._get(Reg.ICS, 4) & ~(value & ICS_IWC))
        elif register in (Reg.FECTL, Reg.IECTL):
            self._put(offset, 4, (self._get(offset, 4) & ~FECTL_IM) | (value & FECTL_IM))
            if not value & FECTL_IM and self._get(offset, 4) & FECTL_IP:    # unmasked: the held event goes
                self._put(offset, 4, 0)
                self._event(offset, offset + 4, offset + 8)
        elif FAULT_RECORD + 12 == offset:
            if value & 1 << 31:                     # F is write-1-to-clear
                self._put(offset, 4, 0)
                self._put(Reg.FSTS, 4, self._get(Reg.FSTS, 4) & ~FSTS_PPF)

    def _complete(self, register: int, busy: int, request_shift: int, actual_shift: int) -> None:
        """A register-based invalidation: done at once, at the granularity asked for."""
        value = self._get(register, 8)
        if value & busy:
            granularity = value >> request_shift & 3
            self._put(register, 8, (value & ~busy & ~(3 << actual_shift)) | granularity << actual_shift)

    def _command(self, command: Global) -> None:
        status = self.status & (Global.TE | Global.IRE | Global.QIE | Global.CFI | Global.SRTP | Global.SIRTP)
        if command & Global.SRTP:
            self.root_table = self._get(Reg.RTADDR, 8) & ADDRESS_BITS
            status |= Global.SRTP
        if command & Global.SIRTP and self.intremap:
            irta = self._get(Reg.IRTA, 8)
            self.irt_base, self.irt_entries = irta & ADDRESS_BITS, 2 << (irta & 0xF)
            status |= Global.SIRTP
        if command & Global.QIE and not status & Global.QIE:
            self._put(Reg.IQH, 8, 0)
        for bit in (Global.TE, Global.QIE) + ((Global.IRE, Global.CFI) if self.intremap else ()):
            status = (status | bit) if command & bit else (status & ~bit)
        self._put(Reg.GSTS, 4, int(status))

    # -- queued invalidation ----------------------------------------------------------
    def _run_queue(self) -> None:
        if not self.status & Global.QIE:
            return
        iqa = self._get(Reg.IQA, 8)
        base, entries = iqa & ADDRESS_BITS, 256 << (iqa & 7)
        head, tail = self._get(Reg.IQH, 8) >> 4, self._get(Reg.IQT, 8) >> 4 & 0x7FFF
        memory = self._memory()
        while head != tail % entries and memory is not None:
            low, high = DESCRIPTOR.unpack(memory.read(base + 16 * head, 16))
            kind = low & 0xF
            if kind == 5:
                self._wait_descriptor(memory, low, high)
            elif kind not in (1, 2, 3, 4):         # context, IOTLB, device-TLB, interrupt entry cache
                self._put(Reg.FSTS, 4, self._get(Reg.FSTS, 4) | FSTS_IQE)
                break
            head = (head + 1) % entries
        self._put(Reg.IQH, 8, head << 4)

    def _wait_descriptor(self, memory: Any, low: int, high: int) -> None:
        if low >> 5 & 1:                            # SW: write the status data
            memory.write(high & ~3, (low >> 32).to_bytes(4, "little"))
        if low >> 4 & 1:                            # IF: the invalidation completion event
            self._put(Reg.ICS, 4, ICS_IWC)
            self._event(Reg.IECTL, Reg.IEDATA, Reg.IEADDR)

    def _event(self, control: int, data: int, address: int) -> None:
        if self._get(control, 4) & FECTL_IM:
            self._put(control, 4, self._get(control, 4) | FECTL_IP)
        else:
            self._deliver(MsiMessage(self._get(address, 4), self._get(address + 4, 4), self._get(data, 4)))

    # -- faults -----------------------------------------------------------------------
    def fault(self, source_id: int, address: int, reason: FaultReason, write: bool) -> None:
        """Record a primary fault (or overflow, with one already pending) and send the fault event."""
        if self._get(FAULT_RECORD + 12, 4) & 1 << 31:
            self._put(Reg.FSTS, 4, self._get(Reg.FSTS, 4) | FSTS_PFO)
            return
        self._put(FAULT_RECORD, 8, address & ~(PAGE - 1))
        self._put(FAULT_RECORD + 8, 8, source_id | int(reason) << 32 | int(not write) << 62 | 1 << 63)
        self._put(Reg.FSTS, 4, self._get(Reg.FSTS, 4) | FSTS_PPF)
        self._event(Reg.FECTL, Reg.FEDATA, Reg.FEADDR)

    # -- DMA remapping ----------------------------------------------------------------
    def translate(self, source_id: int, address: int, write: bool) -> int:
        """The guest-physical address device ``source_id`` (bus:dev.fn) reaches at ``address``.

        Raises :class:`DmaFault` when the tables do not allow it.
        """
        if not self.status & Global.TE:
            return address
        memory = self._memory()
        entry = self._entry(memory, self.root_table + 16 * (source_id >> 8), FaultReason.ROOT_NOT_PRESENT)
        context_low, context_high = DESCRIPTOR.unpack(self._read(memory, (entry & ADDRESS_BITS)
                                                                 + 16 * (source_id & 0xFF), 16))
        if not context_low & 1:
            raise DmaFault(FaultReason.CONTEXT_NOT_PRESENT)
        record = not context_low >> 1 & 1
        if context_low >> 2 & 3 or context_high & 7 != 1:  # translation type 0, 3-level tables only
            raise DmaFault(FaultReason.INVALID_CONTEXT, record)
        if address >> ADDRESS_WIDTH:
            raise DmaFault(FaultReason.BEYOND_ADDRESS_WIDTH, record)
        table, level = context_low & ADDRESS_BITS, LEVELS
        while True:
            shift = 12 + 9 * (level - 1)
            pte = int.from_bytes(self._read(memory, table + 8 * (address >> shift & 0x1FF), 8), "little")
            if not pte & (PTE_WRITE if write else PTE_READ):
                raise DmaFault(FaultReason.WRITE_DENIED if write else FaultReason.READ_DENIED, record)
            table = pte & ADDRESS_BITS
            if level == 1 or pte & PTE_LARGE:          # a 4 KiB page, or a 2 MiB / 1 GiB one
                mask = (1 << shift) - 1
                return (table & ~mask) | (address & mask)
            level -= 1

    def _entry(self, memory: Any, address: int, missing: FaultReason) -> int:
        low = int.from_bytes(self._read(memory, address, 8), "little")
        if not low & 1:
            raise DmaFault(missing)
        return low

    @staticmethod
    def _read(memory: Any, address: int, size: int) -> bytes:
        try:
            return bytes(memory.read(address, size))
        except Exception:      # noqa: BLE001 - outside RAM, or no VM: the walk cannot read its table
            raise DmaFault(FaultReason.TABLE_UNREADABLE) from None

    def dma(self, source_id: int, address: int, size: int, write: bool) -> list[tuple[int, int]]:
        """The guest-physical pieces (address, length) of a device access, one per page; faults recorded."""
        pieces = []
        try:
            while size > 0:
                length = min(size, PAGE - address % PAGE)
                pieces.append((self.translate(source_id, address, write), length))
                address, size = address + length, size - length
        except DmaFault as fault:
            if fault.record:
                self.fault(source_id, address, fault.reason, write)
            raise
        return pieces

    # -- interrupt remapping ------------------------------------------------------------
    def remap_msi(self, source_id: int, address: int, data: int) -> MsiMessage | None:
        """The message an MSI from ``source_id`` becomes, or None if the IOMMU blocks it."""
        if not self.status & Global.IRE:
            return MsiMessage(address & 0xFFFFFFFF, address >> 32, data & 0xFFFFFFFF)
        if not address & MSI_REMAPPABLE:
            if self.status & Global.CFI:
                return MsiMessage(address & 0xFFFFFFFF, address >> 32, data & 0xFFFFFFFF)
            self.fault(source_id, 0, FaultReason.IR_COMPATIBILITY_BLOCKED, True)
            return None
        handle = (address >> 5 & 0x7FFF) | (address >> 2 & 1) << 15
        if address & MSI_SHV:
            handle += data & 0xFFFF
        return self._remap(handle, source_id)

    def remap_ioapic(self, entry: int) -> MsiMessage | None:
        """The message an IOAPIC redirection entry in remappable format (bit 48) becomes, or None if blocked."""
        if not self.status & Global.IRE:
            return None
        return self._remap((entry >> 49 & 0x7FFF) | (entry >> 11 & 1) << 15, None)

    def _remap(self, index: int, source_id: int | None) -> MsiMessage | None:
        reported = 0 if source_id is None else source_id
        if index >= self.irt_entries:
            self.fault(reported, index << 12, FaultReason.IR_INDEX_TOO_LARGE, True)
            return None
        try:
            irte = Irte.from_bytes(self._read(self._memory(), self.irt_base + 16 * index, 16))
        except DmaFault:
            self.fault(reported, index << 12, FaultReason.IR_ENTRY_UNREADABLE, True)
            return None
        problem = (FaultReason.IR_NOT_PRESENT if not irte.present
                   else FaultReason.IR_RESERVED_ENTRY if irte.posted
                   else FaultReason.IR_SOURCE_ID if source_id is not None and not irte.accepts(source_id)
                   else None)
        message = None if problem else irte.message()
        if message is None and not irte.fault_disable:
            self.fault(reported, index << 12, problem or FaultReason.IR_RESERVED_ENTRY, True)
        return message
