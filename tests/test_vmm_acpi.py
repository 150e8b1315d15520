"""The ACPI tables the machine writes (pykvm.vmm.acpi), read back the way a kernel finds them: no KVM needed.

The reader here follows the ACPI 6.0 layouts (header, RSDP, FADT offsets, MADT
entries) on its own, and searches for the RSDP as kvm-unit-tests does: the
16-byte steps of 0xe0000-0xfffff.
"""

from __future__ import annotations

import struct

import pytest

from pykvm.core.errors import InvalidArgument
from pykvm.vmm import acpi, multiboot
from pykvm.vmm.machine import Machine
from pykvm.vmm.testkernels import path as kernel_path

PLATFORM = dict(apic_ids=(0, 1, 2), pm1_event_port=0x600, pm1_control_port=0x604, pm_timer_port=0x608,
                pm_timer_bits=32, reset_port=0xCF9, reset_value=6, sleep_states=((3, 1), (5, 7)),
                hpet_address=0xFED00000, hpet_block_id=0x8086A201)


def low_memory(tables: acpi.Tables) -> bytearray:
    memory = bytearray(1 << 20)
    for address, data in tables.writes:
        memory[address:address + len(data)] = data
    return memory


def find_rsdp(memory: bytes) -> int:
    for address in range(0xE0000, 0x100000, 16):
        if memory[address:address + 8] == b"RSD PTR ":
            return address
    raise AssertionError("no RSDP in 0xe0000-0xfffff")


def read_table(memory: bytes, address: int) -> bytes:
    length = struct.unpack_from("<I", memory, address + 4)[0]
    data = bytes(memory[address:address + length])
    assert sum(data) % 256 == 0, f"{data[:4]!r} checksum"
    return data


def tables_by_signature(memory: bytes) -> dict[bytes, tuple[int, bytes]]:
    rsdp = find_rsdp(memory)
    _, _, _, revision, rsdt, length, xsdt, _, _ = struct.unpack_from("<8sB6sBIIQB3s", memory, rsdp)
    assert revision == 2 and length == 36
    assert sum(memory[rsdp:rsdp + 20]) % 256 == 0 and sum(memory[rsdp:rsdp + 36]) % 256 == 0
    rsdt_data, xsdt_data = read_table(memory, rsdt), read_table(memory, xsdt)
    assert rsdt_data[:4] == b"RSDT" and xsdt_data[:4] == b"XSDT"
    pointers = struct.unpack(f"<{(len(rsdt_data) - 36) // 4}I", rsdt_data[36:])
    assert struct.unpack(f"<{(len(xsdt_data) - 36) // 8}Q", xsdt_data[36:]) == pointers
    found = {}
    for address in pointers:
        data = read_table(memory, address)
        found[data[:4]] = (address, data)
    return found


@pytest.fixture
def memory() -> bytearray:
    return low_memory(acpi.build(acpi.Platform(**PLATFORM)))


def test_a_kernel_finds_the_rsdp_and_every_table_with_right_checksums(memory):
    assert find_rsdp(memory) == acpi.RSDP_ADDRESS
    assert sorted(tables_by_signature(memory)) == [b"APIC", b"FACP", b"HPET"]


def test_the_fadt_gives_the_pm_blocks_the_reset_register_facs_and_dsdt(memory):
    address, fadt = tables_by_signature(memory)[b"FACP"]
    assert len(fadt) == 276 and fadt[8] == 6 and fadt[131] == 0           # ACPI 6.0
    facs, dsdt = struct.unpack_from("<II", fadt, 36)
    sci, smi_cmd = struct.unpack_from("<HI", fadt, 46)
    pm1a_evt, pm1b_evt, pm1a_cnt, _, _, pm_tmr = struct.unpack_from("<6I", fadt, 56)
    assert (sci, smi_cmd, pm1a_evt, pm1b_evt, pm1a_cnt, pm_tmr) == (9, 0, 0x600, 0, 0x604, 0x608)
    assert fadt[88:92] == bytes([4, 2, 0, 4])                               # block lengths
    flags = struct.unpack_from("<I", fadt, 112)[0]
    assert flags & (1 << 8) and flags & (1 << 10)                           # TMR_VAL_EXT, RESET_REG_SUP
    assert struct.unpack_from("<BBBBQB", fadt, 116) == (1, 8, 0, 1, 0xCF9, 6)   # SystemIO byte 0xcf9, value 6
    assert struct.unpack_from("<QQ", fadt, 132) == (0, 0)                  # 32-bit pointers only
    assert struct.unpack_from("<BBBBQ", fadt, 208) == (1, 32, 0, 3, 0x608)  # X_PM_TMR_BLK
    assert memory[facs:facs + 4] == b"FACS" and facs % 64 == 0
    assert struct.unpack_from("<I", memory, facs + 4)[0] == 64 and memory[facs + 32] == 2
    assert read_table(memory, dsdt)[:4] == b"DSDT"


def test_a_24_bit_pm_timer_clears_tmr_val_ext():
    memory = low_memory(acpi.build(acpi.Platform(**{**PLATFORM, "pm_timer_bits": 24})))
    _, fadt = tables_by_signature(memory)[b"FACP"]
    assert not struct.unpack_from("<I", fadt, 112)[0] & (1 << 8)


def test_the_dsdt_holds_exactly_the_sleep_packages(memory):
    _, fadt = tables_by_signature(memory)[b"FACP"]
    dsdt = read_table(memory, struct.unpack_from("<I", fadt, 40)[0])
    # Name(\_S3_, Package(4) {One, One, Zero, Zero}), Name(\_S5_, Package(4) {7, 7, Zero, Zero})
    assert dsdt[36:] == (b"\x08\\_S3_\x12\x06\x04\x01\x01\x00\x00"
                         b"\x08\\_S5_\x12\x08\x04\x0a\x07\x0a\x07\x00\x00")


def test_the_madt_lists_each_local_apic_and_the_ioapic_without_overrides(memory):
    _, madt = tables_by_signature(memory)[b"APIC"]
    assert struct.unpack_from("<II", madt, 36) == (0xFEE00000, 1)          # PCAT_COMPAT
    entries, offset = [], 44
    while offset < len(madt):
        kind, length = madt[offset], madt[offset + 1]
        entries.append((kind, madt[offset:offset + length]))
        offset += length
    assert offset == len(madt)
    assert [struct.unpack("<BBBBI", e) for k, e in entries if k == 0] == [(0, 8, i, i, 1) for i in (0, 1, 2)]
    assert [struct.unpack("<BBBBII", e) for k, e in entries if k == 1] == [(1, 12, 0, 0, 0xFEC00000, 0)]
    assert [k for k, _ in entries if k not in (0, 1)] == []


def test_the_hpet_table_gives_the_block_id_and_address(memory):
    _, table = tables_by_signature(memory)[b"HPET"]
    assert len(table) == 56
    assert struct.unpack_from("<IBBBBQBHB", table, 36) == (0x8086A201, 0, 64, 0, 0, 0xFED00000, 0, 0, 0)


def test_the_tables_lie_in_the_ranges_the_memory_map_gives_acpi():
    tables = acpi.build(acpi.Platform(**PLATFORM))
    e820 = multiboot.e820_map(64 << 20)
    kinds = {address: kind for address, _, kind in e820}
    nvs, reclaim = multiboot.ACPI_NVS, multiboot.ACPI_TABLES
    assert kinds[nvs[0]] == multiboot.E820_NVS and kinds[reclaim[0]] == multiboot.E820_ACPI
    for address, data in tables.writes:
        if data[:4] == b"FACS":
            assert nvs[0] <= address and address + len(data) <= sum(nvs)
        elif data[:8] == b"RSD PTR ":
            assert (0xF0000, 0x10000, multiboot.E820_RESERVED) in e820
        else:
            assert reclaim[0] <= address and address + len(data) <= sum(reclaim)
    assert sorted(tables.addresses) == ["APIC", "DSDT", "FACP", "FACS", "HPET", "RSDP", "RSDT", "XSDT"]


def test_255_cpus_still_fit():
    memory = low_memory(acpi.build(acpi.Platform(**{**PLATFORM, "apic_ids": tuple(range(255))})))
    assert len(tables_by_signature(memory)[b"APIC"][1]) == 44 + 255 * 8 + 12


def test_the_waking_vectors_are_read_from_the_facs():
    facs = bytearray(acpi.facs())
    assert acpi.waking_vectors(bytes(facs)) == (0, 0)
    facs[12:16] = (0x1000).to_bytes(4, "little")
    facs[24:32] = (0x123456789).to_bytes(8, "little")
    assert acpi.waking_vectors(bytes(facs)) == (0x1000, 0x123456789)


def test_the_machine_builds_tables_for_its_vcpus():
    machine = Machine(kernel_path("hello"), cpus=4)
    memory = low_memory(machine.acpi)
    _, madt = tables_by_signature(memory)[b"APIC"]
    assert [madt[offset + 3] for offset in range(44, 44 + 4 * 8, 8)] == [0, 1, 2, 3]
    assert (acpi.FACS_ADDRESS, acpi.facs()) in machine.acpi.writes


@pytest.mark.parametrize(("change", "message"), [
    ({"apic_ids": ()}, "apic_ids=\\(\\): expected one xAPIC ID"),
    ({"apic_ids": (0, 0)}, "its own APIC ID"),
    ({"apic_ids": (0, 255)}, "0-254"),
    ({"pm_timer_bits": 16}, "24 or 32 bits"),
    ({"pm_timer_port": 0x10000}, "pm_timer_port=65536: expected an IO port"),
    ({"reset_value": -1}, "reset_value=-1: expected a byte"),
    ({"sleep_states": ((3, 8),)}, "SLP_TYP of S3=8"),
    ({"hpet_block_id": 1 << 32}, "hpet_block_id"),
])
def test_a_platform_the_tables_cannot_express_is_refused(change, message):
    with pytest.raises(acpi.AcpiError, match=message) as caught:
        acpi.Platform(**{**PLATFORM, **change})
    assert isinstance(caught.value, InvalidArgument)
