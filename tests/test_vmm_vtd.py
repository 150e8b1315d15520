"""The VT-d IOMMU model (pykvm.vmm.vtd) on a fake guest memory: registers, DMA and interrupt remapping, faults.

Each test programs the unit as a guest driver does (tables in memory, then
GCMD) and asserts what the guest would read back or what a device would reach.
"""

from __future__ import annotations

import struct

import pytest

from pykvm.core.interrupts import MsiMessage
from pykvm.vmm import vtd
from pykvm.vmm.vtd import FaultReason, Global, Reg

pytestmark = pytest.mark.host_independent

ROOT, CONTEXT, LEVEL3, LEVEL2, LEVEL1, IRT, QUEUE = (0x10000 + 0x1000 * n for n in range(7))
PAGE = 0x40000              # the page the device's IOVA 0 maps to
EDU = 0x0010                # 00:02.0
RW = 3


class Memory:
    """A guest memory of 1 MiB with the read/write interface of pykvm's ``vm.memory``."""

    def __init__(self) -> None:
        self.data = bytearray(1 << 20)

    def read(self, gpa: int, size: int) -> bytes:
        if gpa + size > len(self.data):
            raise ValueError(f"{gpa:#x} is outside RAM")
        return bytes(self.data[gpa:gpa + size])

    def write(self, gpa: int, data: bytes) -> None:
        self.data[gpa:gpa + len(data)] = data

    def put(self, gpa: int, value: int, size: int = 8) -> None:
        self.write(gpa, value.to_bytes(size, "little"))


@pytest.fixture
def memory() -> Memory:
    return Memory()


@pytest.fixture
def sent() -> list[MsiMessage]:
    return []


@pytest.fixture
def unit(memory, sent) -> vtd.Vtd:
    return vtd.Vtd(lambda: memory, sent.append, intremap=True)


def command(unit: vtd.Vtd, bit: Global) -> None:
    """What kvm-unit-tests' vtd_gcmd_or does: GSTS with one more command bit."""
    unit.write(Reg.GCMD, 4, unit.read(Reg.GSTS, 4) | bit)


def map_page(memory: Memory, iova: int, gpa: int, source: int = EDU, fault_disable: bool = False,
             level1_rights: int = RW) -> None:
    """Root entry, context entry (39-bit, 3 levels) and the three table levels mapping one 4 KiB page."""
    memory.put(ROOT + 16 * (source >> 8), CONTEXT | 1)
    memory.put(CONTEXT + 16 * (source & 0xFF), LEVEL3 | int(fault_disable) << 1 | 1)
    memory.put(CONTEXT + 16 * (source & 0xFF) + 8, 1 | source << 8)       # AW=1 (39 bits), domain ID
    memory.put(LEVEL3 + 8 * (iova >> 30 & 0x1FF), LEVEL2 | RW)
    memory.put(LEVEL2 + 8 * (iova >> 21 & 0x1FF), LEVEL1 | RW)
    memory.put(LEVEL1 + 8 * (iova >> 12 & 0x1FF), gpa | level1_rights)


def enable_translation(unit: vtd.Vtd) -> None:
    unit.write(Reg.RTADDR, 8, ROOT)
    command(unit, Global.SRTP)
    command(unit, Global.TE)


def irte(vector: int, destination: int, source: int = EDU, validate: int = 1, present: bool = True) -> bytes:
    low = int(present) | vector << 16 | destination << 40        # xAPIC: APIC ID in bits 15:8 of DST
    return struct.pack("<QQ", low, source | validate << 18)


def enable_remapping(unit: vtd.Vtd, memory: Memory, entries: dict[int, bytes]) -> None:
    for index, raw in entries.items():
        memory.write(IRT + 16 * index, raw)
    unit.write(Reg.IRTA, 8, IRT | 0xF)                           # 2^16 entries
    command(unit, Global.SIRTP)
    command(unit, Global.IRE)


# -- registers -------------------------------------------------------------------------------

def test_version_and_capabilities_say_what_kvm_unit_tests_checks(unit):
    assert unit.read(Reg.VER, 4) >> 4 & 0xF == 1                 # major version 1
    cap = unit.read(Reg.CAP, 8)
    assert cap >> 8 & 0x1F == 0b00010                            # SAGAW: 39-bit (3-level) only
    assert cap >> 16 & 0x3F == 38                                # MGAW: 39 bits
    assert cap >> 34 & 3 == 3                                    # SLLPS: 2 MiB and 1 GiB
    assert (cap >> 24 & 0x3FF) * 16 == vtd.FAULT_RECORD
    ecap = unit.read(Reg.ECAP, 8)
    assert ecap >> 1 & 1 and ecap >> 3 & 1 and not ecap >> 4 & 1     # QI, IR, no EIM
    assert (ecap >> 8 & 0x3FF) * 16 == vtd.IOTLB_BASE
    assert unit.read(Reg.CAP + 4, 4) == cap >> 32                # halves read as the whole


def test_without_intremap_the_unit_neither_offers_nor_enables_interrupt_remapping(memory, sent):
    unit = vtd.Vtd(lambda: memory, sent.append, intremap=False)
    assert not unit.read(Reg.ECAP, 8) >> 3 & 1
    command(unit, Global.IRE)
    assert not unit.read(Reg.GSTS, 4) & Global.IRE


def test_commands_show_in_status_and_the_one_shots_latch_the_table_pointers(unit):
    assert unit.read(Reg.GSTS, 4) == 0 and unit.read(Reg.FSTS, 4) == 0
    unit.write(Reg.RTADDR, 4, ROOT)
    unit.write(Reg.RTADDR + 4, 4, 0)
    assert unit.root_table == 0                                   # not until SRTP
    command(unit, Global.SRTP)
    assert unit.root_table == ROOT and unit.read(Reg.GSTS, 4) & Global.SRTP
    for bit in (Global.QIE, Global.TE):
        command(unit, bit)
    status = unit.read(Reg.GSTS, 4)
    assert status & Global.QIE and status & Global.TE and unit.read(Reg.GCMD, 4) == 0
    unit.write(Reg.GCMD, 4, status & ~Global.TE)                  # clearing a bit turns it off
    assert not unit.read(Reg.GSTS, 4) & Global.TE and unit.read(Reg.GSTS, 4) & Global.QIE


@pytest.mark.parametrize("register, busy, asked, actual", [(Reg.CCMD, 63, 61, 59), (Reg.IOTLB, 63, 60, 57)])
def test_register_invalidations_complete_at_once_at_the_granularity_asked(unit, register, busy, asked, actual):
    unit.write(register, 8, 1 << busy | 2 << asked)
    value = unit.read(register, 8)
    assert not value >> busy & 1 and value >> actual & 3 == 2


def test_the_invalidation_queue_runs_a_wait_descriptor(unit, memory):
    status = 0x2000
    memory.write(QUEUE, struct.pack("<QQ", 2, 0))                              # an IOTLB invalidation
    memory.write(QUEUE + 16, struct.pack("<QQ", 5 | 1 << 4 | 1 << 5 | 0xABCD << 32, status))
    unit.write(Reg.IQA, 8, QUEUE)
    command(unit, Global.QIE)
    unit.write(Reg.IQT, 8, 2 << 4)
    assert unit.read(Reg.IQH, 8) == 2 << 4
    assert memory.read(status, 4) == (0xABCD).to_bytes(4, "little")
    assert unit.read(Reg.ICS, 4) == 1
    unit.write(Reg.ICS, 4, 1)                                                   # write 1 to clear
    assert unit.read(Reg.ICS, 4) == 0


def test_an_unknown_descriptor_stops_the_queue_with_iqe(unit, memory):
    memory.write(QUEUE, struct.pack("<QQ", 0xF, 0))
    unit.write(Reg.IQA, 8, QUEUE)
    command(unit, Global.QIE)
    unit.write(Reg.IQT, 8, 1 << 4)
    assert unit.read(Reg.IQH, 8) == 0 and unit.read(Reg.FSTS, 4) & vtd.FSTS_IQE


# -- DMA remapping ---------------------------------------------------------------------------------

def test_with_translation_off_a_device_address_is_guest_physical(unit):
    assert unit.translate(EDU, 0x12345, write=True) == 0x12345


def test_a_mapped_page_translates_and_keeps_the_offset(unit, memory):
    map_page(memory, 0x7000, PAGE)
    enable_translation(unit)
    assert unit.translate(EDU, 0x7004, write=False) == PAGE + 4
    assert unit.dma(EDU, 0x7FFC, 4, write=True) == [(PAGE + 0xFFC, 4)]
    assert unit.read(Reg.FSTS, 4) == 0


def test_a_2_mib_page_at_level_2(unit, memory):
    map_page(memory, 0, PAGE)
    memory.put(LEVEL2, 0x200000 | vtd.PTE_LARGE | RW)                 # IOVA 0-2 MiB -> 2 MiB-4 MiB
    enable_translation(unit)
    assert unit.translate(EDU, 0x12345, write=True) == 0x212345


def test_another_device_has_no_context_and_faults_with_its_source_id(unit, memory):
    map_page(memory, 0, PAGE)
    enable_translation(unit)
    other = 0x0018
    with pytest.raises(vtd.DmaFault) as fault:
        unit.dma(other, 0x10, 4, write=False)
    assert fault.value.reason == FaultReason.CONTEXT_NOT_PRESENT
    assert unit.read(Reg.FSTS, 4) & vtd.FSTS_PPF
    record = unit.read(vtd.FAULT_RECORD + 8, 8)
    assert record & 0xFFFF == other and record >> 32 & 0xFF == FaultReason.CONTEXT_NOT_PRESENT
    assert record >> 62 & 1 == 1 and record >> 63 == 1                  # a read, and F
    unit.write(vtd.FAULT_RECORD + 12, 4, 1 << 31)                        # clear F: PPF goes
    assert unit.read(Reg.FSTS, 4) == 0


def test_a_write_to_a_read_only_page_faults_but_fpd_keeps_it_off_the_record(unit, memory):
    map_page(memory, 0, PAGE, fault_disable=True, level1_rights=vtd.PTE_READ)
    enable_translation(unit)
    assert unit.translate(EDU, 0, write=False) == PAGE                  # control: reading is allowed
    with pytest.raises(vtd.DmaFault) as fault:
        unit.dma(EDU, 0, 4, write=True)
    assert fault.value.reason == FaultReason.WRITE_DENIED and unit.read(Reg.FSTS, 4) == 0


def test_an_address_beyond_39_bits_faults(unit, memory):
    map_page(memory, 0, PAGE)
    enable_translation(unit)
    with pytest.raises(vtd.DmaFault, match="BEYOND_ADDRESS_WIDTH"):
        unit.translate(EDU, 1 << 39, write=False)


# -- interrupt remapping --------------------------------------------------------------------------

def test_a_remappable_msi_becomes_what_its_entry_says(unit, memory):
    enable_remapping(unit, memory, {2: irte(0xEE, destination=1)})
    message = unit.remap_msi(EDU, 0xFEE00050, 0)                # handle 2, as kvm-unit-tests composes it
    assert message == MsiMessage.compose(destination=1, vector=0xEE)


def test_the_subhandle_adds_to_the_handle_when_shv_is_set(unit, memory):
    enable_remapping(unit, memory, {5: irte(0x41, destination=0)})
    assert unit.remap_msi(EDU, 0xFEE00000 | 2 << 5 | vtd.MSI_REMAPPABLE | vtd.MSI_SHV, 3).data & 0xFF == 0x41


def test_source_id_validation_blocks_another_requester(unit, memory):
    enable_remapping(unit, memory, {2: irte(0xEE, destination=0)})
    assert unit.remap_msi(0x0018, 0xFEE00050, 0) is None
    assert unit.read(vtd.FAULT_RECORD + 8, 8) >> 32 & 0xFF == FaultReason.IR_SOURCE_ID
    assert unit.remap_msi(EDU, 0xFEE00050, 0) is not None              # control: the entry's own device


def test_a_not_present_entry_blocks(unit, memory):
    enable_remapping(unit, memory, {2: irte(0xEE, destination=0, present=False)})
    assert unit.remap_msi(EDU, 0xFEE00050, 0) is None


def test_compatibility_format_passes_only_with_cfi(unit, memory):
    enable_remapping(unit, memory, {})
    plain = MsiMessage.compose(destination=0, vector=0x30)
    assert unit.remap_msi(EDU, plain.address_lo, plain.data) is None
    command(unit, Global.CFI)
    assert unit.remap_msi(EDU, plain.address_lo, plain.data) == plain


def test_without_remapping_enabled_messages_pass_unchanged(unit):
    plain = MsiMessage.compose(destination=0, vector=0x30)
    assert unit.remap_msi(EDU, plain.address_lo, plain.data) == plain


def test_an_ioapic_entry_in_remappable_format_names_its_irte(unit, memory):
    enable_remapping(unit, memory, {1: irte(0xED, destination=0, source=EDU)})
    entry = 0xED | 1 << 48 | 1 << 49                             # vector, format, handle 1
    assert unit.remap_ioapic(entry) == MsiMessage.compose(destination=0, vector=0xED)
    # the IOAPIC's messages carry no requester ID: the entry's SVT (edu's SID) does not block them
    assert unit.remap_ioapic(0xED | 1 << 48 | 2 << 49) is None    # handle 2 is not present


def test_the_fault_event_is_held_while_masked_and_sent_when_unmasked(unit, memory, sent):
    enable_translation(unit)                                      # an empty root table: every DMA faults
    unit.write(Reg.FEDATA, 4, 0x51)
    unit.write(Reg.FEADDR, 4, 0xFEE00000)
    with pytest.raises(vtd.DmaFault):
        unit.dma(EDU, 0, 4, write=False)
    assert sent == [] and unit.read(Reg.FECTL, 4) == vtd.FECTL_IM | vtd.FECTL_IP     # masked after reset
    unit.write(Reg.FECTL, 4, 0)
    assert sent == [MsiMessage(0xFEE00000, 0, 0x51)] and unit.read(Reg.FECTL, 4) == 0
    unit.write(vtd.FAULT_RECORD + 12, 4, 1 << 31)
    with pytest.raises(vtd.DmaFault):
        unit.dma(EDU, 0, 4, write=False)
    assert len(sent) == 2                                          # unmasked: sent at once


def test_a_second_fault_while_one_is_recorded_sets_overflow(unit):
    enable_translation(unit)
    for _ in range(2):
        with pytest.raises(vtd.DmaFault):
            unit.dma(EDU, 0, 4, write=False)
    assert unit.read(Reg.FSTS, 4) == vtd.FSTS_PPF | vtd.FSTS_PFO
    unit.write(Reg.FSTS, 4, vtd.FSTS_PFO)                         # PFO is write-1-to-clear, PPF is not
    assert unit.read(Reg.FSTS, 4) == vtd.FSTS_PPF
