"""Unit tests of pykvm.vmm without KVM: the Multiboot parser and layout, fw_cfg, the devices, the buses.

Malformed images (truncated, wrong magic, bad checksum, overlapping segments,
entry outside memory, ...) must each raise a typed error naming what is wrong.
"""

from __future__ import annotations

import os
import struct

import pytest

from pykvm.vmm import FwCfg, FwCfgError, FwCfgKey, MultibootError, multiboot, testkernels
from pykvm.vmm.bus import IoBus, MmioBus
from pykvm.vmm.cmos import Cmos
from pykvm.vmm.debug_exit import status_of
from pykvm.vmm.serial import Uart16550
from pykvm.vmm.testdev import IrqLines, Scratch

MAGIC = multiboot.HEADER_MAGIC


def header(flags: int = 3, *addresses: int, checksum: int | None = None) -> bytes:
    checksum = -(MAGIC + flags) & 0xFFFFFFFF if checksum is None else checksum
    return struct.pack("<III", MAGIC, flags, checksum) + struct.pack(f"<{len(addresses)}I", *addresses)


def elf(segments: list[tuple[int, bytes, int]], entry: int, elf_class: int = 1, machine: int = 3,
        with_header: bool = True) -> bytes:
    """A minimal ELF32 executable: (paddr, data, memsz) segments, the Multiboot header in the first."""
    phoff = 52
    data_offset = phoff + 32 * len(segments)
    body = bytearray()
    phdrs = bytearray()
    for index, (paddr, data, memsz) in enumerate(segments):
        if index == 0 and with_header:
            data = header() + data[12:]
        phdrs += struct.pack("<IIIIIIII", 1, data_offset + len(body), paddr, paddr, len(data), memsz, 7, 4)
        body += data
    ident = b"\x7fELF" + bytes([elf_class, 1, 1]) + bytes(9)
    ehdr = struct.pack("<16sHHIIIIIHHHHHH", ident, 2, machine, 1, entry, phoff, 0, 0, 52, 32, len(segments),
                       40, 0, 0)
    return ehdr + bytes(phdrs) + bytes(body)


KERNEL = elf([(0x100000, bytes(64), 0x2000)], 0x100010)


# ---- the parser: good images ----------------------------------------------------------

def test_an_elf_kernel_gives_its_segments_and_entry():
    image = multiboot.parse(KERNEL)
    assert image.format == "elf" and image.entry == 0x100010
    assert [(s.address, len(s.data), s.memory_size) for s in image.segments] == [(0x100000, 64, 0x2000)]


def test_a_higher_half_entry_is_translated_to_its_physical_address():
    data = bytearray(KERNEL)
    struct.pack_into("<I", data, 24, 0xC0100010)                    # e_entry, virtual
    struct.pack_into("<I", data, 52 + 8, 0xC0100000)                # p_vaddr
    assert multiboot.parse(bytes(data)).entry == 0x100010


def test_the_header_address_fields_load_a_flat_binary():
    code = header(0x10003, 0x200000, 0x200000, 0x200100, 0x201000, 0x200020) + bytes(0x100 - 32)
    image = multiboot.parse(code)
    assert image.format == "a.out kludge" and image.entry == 0x200020
    assert [(s.address, len(s.data), s.memory_size) for s in image.segments] == [(0x200000, 0x100, 0x1000)]


def test_the_built_test_kernels_parse():
    for name in testkernels.KERNELS:
        image = multiboot.parse(testkernels.path(name).read_bytes(), name)
        assert image.entry >= 0x100000 and image.format == "elf"
    assert multiboot.parse(testkernels.path("hello-aout.bin").read_bytes()).format == "a.out kludge"


# ---- the parser: malformed images, each a MultibootError saying what -------------------

@pytest.mark.parametrize("data, words", [
    (b"", "truncated"),
    (b"\x7fELF" + bytes(200), "ELF file without a Multiboot header"),
    (bytes(9000), "no Multiboot header"),
    (bytes(8192) + header(), "no Multiboot header"),                      # beyond the first 8 KiB
    (bytes(2) + header() + bytes(100), "no Multiboot header"),            # not 4-byte aligned
    (struct.pack("<I", 0xE85250D6) + bytes(100), "Multiboot2"),
    (header(checksum=0x12345678) + bytes(100), "wrong checksum"),
    (header(3 | 1 << 5) + bytes(100), "flags bits 5"),
    (header(3) + bytes(100), "no address fields"),
    (header(0x10003, 0x200000) + bytes(4), "truncated"),
    (header(0x10003, 0x200000, 0x200000, 0x300000, 0, 0x200000), "truncated"),
    (header(0x10003, 0x200000, 0x200100, 0x200200, 0, 0x200100), "inconsistent"),
    (header(0x10003, 0x200000, 0x200000, 0x1FF000, 0, 0x200000), "below load_addr"),
    (header(0x10003, 0x200000, 0x200000, 0x200040, 0x200020, 0x200000) + bytes(64), "bss_end_addr"),
    (header(0x10003, 0x200000, 0x200000, 0, 0, 0x400000) + bytes(64), "entry point 0x400000 is outside"),
    (b"\x7fELF" + header() + bytes(20), "truncated: 36 bytes, shorter than an ELF header"),
    (KERNEL[:60], "ELF file without a Multiboot header"),
    (KERNEL[:120], "truncated: segment 0 .* the file ends at 0x78"),
    (KERNEL[:28] + struct.pack("<I", 0x1000) + KERNEL[32:], "truncated: 1 program headers at offset 0x1000"),
    (elf([(0x100000, bytes(64), 0x2000)], 0x100010, elf_class=2), "ELF64"),
    (elf([(0x100000, bytes(64), 0x2000)], 0x100010, machine=62), "not i386"),
    (elf([(0x100000, bytes(64), 0x2000), (0x101000, bytes(16), 0x10)], 0x100010), "segments 0"),
    (elf([(0x100000, bytes(64), 0x40)], 0x300000), "entry point 0x300000 is outside every loaded segment"),
    (elf([(0x100000, bytes(64), 0x20)], 0x100000), "exceeds its memory size"),
])
def test_malformed_images_raise_a_typed_error_naming_the_problem(data, words):
    with pytest.raises(MultibootError, match=words) as caught:
        multiboot.parse(data, "k.elf")
    assert isinstance(caught.value, ValueError)
    assert str(caught.value).startswith("k.elf: ")


def test_overlapping_segments_name_both():
    data = elf([(0x100000, bytes(64), 0x2000), (0x101000, bytes(16), 0x10)], 0x100010)
    with pytest.raises(MultibootError, match=r"segments 0 \(0x100000-0x102000\) and 1 \(0x101000-0x101010\) overlap"):
        multiboot.parse(data)


# ---- layout against memory ----------------------------------------------------------------

@pytest.mark.parametrize("segments, entry, memory, words", [
    ([(0x100000, bytes(64), 0x2000)], 0x100010, 1 << 20, "at least 2 MiB"),
    ([(0x7F0000, bytes(64), 0x20000)], 0x7F0010, 8 << 20, "outside memory"),
    ([(0x2000, bytes(64), 0x100)], 0x2010, 8 << 20, "boot information area"),
    ([(0x9F000, bytes(64), 0x2000)], 0x9F010, 8 << 20, "hole below 1 MiB"),
])
def test_an_image_that_does_not_fit_the_machine_is_refused(segments, entry, memory, words):
    with pytest.raises(MultibootError, match=words):
        multiboot.place(multiboot.parse(elf(segments, entry)), memory)


def test_the_information_structure():
    modules = [multiboot.Module(b"abc", "initrd.img"), multiboot.Module(bytes(5000), "two")]
    layout = multiboot.place(multiboot.parse(KERNEL), 32 << 20, "console=ttyS0", modules)
    memory = bytearray(32 << 20)
    for address, data in layout.writes:
        memory[address:address + len(data)] = data
    info = struct.unpack_from("<22I", memory, layout.info_address)
    flags, lower, upper, _, cmdline, count, mods = info[:7]
    assert flags & 0b1001001101 == 0b1001001101          # memory, cmdline, mods, mmap, loader name
    assert (lower, upper) == (639, 31 * 1024)
    assert memory[cmdline:memory.index(0, cmdline)] == b"console=ttyS0"
    assert count == 2
    starts = [struct.unpack_from("<IIII", memory, mods + 16 * i) for i in range(2)]
    assert [(end - start) for start, end, _, _ in starts] == [3, 5000]
    assert all(start % 4096 == 0 and start >= 0x102000 for start, *_ in starts)
    assert memory[starts[0][0]:starts[0][1]] == b"abc"
    assert memory[starts[0][2]:memory.index(0, starts[0][2])] == b"initrd.img"
    mmap_length, mmap_address = info[11], info[12]
    entries = [struct.unpack_from("<IQQI", memory, mmap_address + offset) for offset in range(0, mmap_length, 24)]
    assert [entry[1:] for entry in entries] == list(multiboot.e820_map(32 << 20))
    assert all(entry[0] == 20 for entry in entries)
    assert memory[info[16]:info[16] + 6] == b"pykvm\0"


def test_memory_above_3_gib_is_mapped_above_4_gib():
    assert multiboot.ram_ranges(4 << 30) == ((0, 3 << 30), (1 << 32, 1 << 30))
    assert multiboot.e820_map(4 << 30)[-1] == (1 << 32, 1 << 30, 1)


def test_a_nul_in_the_command_line_is_refused():
    with pytest.raises(MultibootError, match="NUL"):
        multiboot.place(multiboot.parse(KERNEL), 8 << 20, "a\0b")


def test_a_command_line_too_long_for_the_boot_area_is_refused():
    with pytest.raises(MultibootError, match="shorten"):
        multiboot.place(multiboot.parse(KERNEL), 8 << 20, "x" * 40000)


def test_the_command_line_is_the_kernel_then_its_arguments_as_qemu_makes_it():
    assert multiboot.command_line("x86/vmexit.flat", "cpuid") == "x86/vmexit.flat cpuid"
    assert multiboot.command_line("x86/dummy.flat") == "x86/dummy.flat "        # QEMU keeps the space
    assert multiboot.command_line("./k", " a  b ") == "./k  a  b "              # the arguments verbatim


def test_a_command_line_keeps_an_undecodable_paths_bytes():
    layout = multiboot.place(multiboot.parse(KERNEL), 8 << 20, multiboot.command_line(os.fsdecode(b"k\xff.elf"), "x"))
    assert any(b"k\xff.elf x\0" in data for _, data in layout.writes)
    with pytest.raises(MultibootError, match="not encodable as UTF-8"):
        multiboot.place(multiboot.parse(KERNEL), 8 << 20, "\ud800")


def test_the_machine_gives_the_kernel_its_path_as_argv0(tmp_path):
    from pykvm.vmm import Machine
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(KERNEL)
    machine = Machine(kernel, cmdline="cpuid")
    assert (machine.cmdline, machine.boot_cmdline) == ("cpuid", f"{kernel} cpuid")
    assert any(f"{kernel} cpuid\0".encode() in data for _, data in machine.layout.writes)
    assert Machine(KERNEL).boot_cmdline == "kernel "


def test_a_segments_bss_costs_no_memory_before_the_run():
    # 64 bytes of file, 3 GiB of memsz: the layout writes the file's bytes; RAM's zeros are the bss.
    big = elf([(0x100000, bytes(64), 0xBFF00000)], 0x100010)
    layout = multiboot.place(multiboot.parse(big), 4 << 30)
    assert sum(len(data) for _, data in layout.writes) < 4096
    with pytest.raises(MultibootError, match="outside memory"):
        multiboot.place(multiboot.parse(big), (3 << 30) - (1 << 20))     # 1 MiB short: refused, nothing allocated


# ---- fw_cfg ------------------------------------------------------------------------------------

def read_item(fw_cfg: FwCfg, key: int, size: int) -> bytes:
    fw_cfg.write(0, 2, key)
    return bytes(fw_cfg.read(1, 1) for _ in range(size))


def test_fw_cfg_items_as_the_guest_reads_them():
    e820 = multiboot.e820_map(64 << 20)
    fw_cfg = FwCfg.for_machine(64 << 20, 2, 4, "quiet", e820)
    assert read_item(fw_cfg, FwCfgKey.SIGNATURE, 4) == b"QEMU"
    assert read_item(fw_cfg, FwCfgKey.ID, 4) == b"\x01\0\0\0"
    assert read_item(fw_cfg, FwCfgKey.NB_CPUS, 2) == b"\x02\0"
    assert read_item(fw_cfg, FwCfgKey.MAX_CPUS, 2) == b"\x04\0"
    assert read_item(fw_cfg, FwCfgKey.RAM_SIZE, 8) == struct.pack("<Q", 64 << 20)
    assert read_item(fw_cfg, FwCfgKey.CMDLINE_SIZE, 4) == b"\x06\0\0\0"
    assert read_item(fw_cfg, FwCfgKey.CMDLINE_DATA, 7) == b"quiet\0\0"        # zeros past the end
    assert read_item(fw_cfg, 0x1F, 2) == b"\0\0"                                # unknown key: zeros
    directory = read_item(fw_cfg, FwCfgKey.FILE_DIR, 4 + 64)
    count, (size, select, _, name) = struct.unpack(">I", directory[:4])[0], struct.unpack(">IHH56s", directory[4:])
    assert (count, size, select, name.rstrip(b"\0")) == (1, 20 * len(e820), 0x20, b"etc/e820")
    table = read_item(fw_cfg, select, size)
    assert [struct.unpack_from("<QQI", table, offset) for offset in range(0, size, 20)] == list(e820)
    assert fw_cfg.read(0, 2) == select


def test_fw_cfg_files_get_keys_from_0x20_in_order():
    fw_cfg = FwCfg()
    assert [fw_cfg.add_file(name, b"x") for name in ("a", "b/c")] == [0x20, 0x21]
    assert fw_cfg.files == ("a", "b/c") and fw_cfg.file("b/c") == b"x"


@pytest.mark.parametrize("call, words", [
    (lambda f: f.add_file("x" * 56, b""), "at most 55 bytes"),
    (lambda f: f.add_file("", b""), "non-empty"),
    (lambda f: f.add_file("é", b""), "ASCII"),
    (lambda f: (f.add_file("etc/e820", b""), f.add_file("etc/e820", b"")), "already in the directory"),
    (lambda f: f.add_file("etc/x", "text"), "must be bytes"),
    (lambda f: f.add(0x20, b""), "belong to files"),
    (lambda f: f.add(0x19, b""), "file directory"),
    (lambda f: f.add(-1, b""), "fixed keys"),
    (lambda f: f.add("5", b""), "integer"),
    (lambda f: f.file("nope"), "no fw_cfg file 'nope'"),
    (lambda f: FwCfg.for_machine(1 << 20, 1, cmdline="a\0b"), "NUL"),
])
def test_fw_cfg_misuse_raises_a_typed_error(call, words):
    with pytest.raises(FwCfgError, match=words):
        call(FwCfg())


# ---- devices --------------------------------------------------------------------------------------

def test_uart_transmits_and_shows_an_empty_transmitter():
    sent, irqs = [], []
    uart = Uart16550(sent.append, irqs.append)
    for byte in b"hi":
        uart.write(0, 1, byte)
    assert sent == [b"h", b"i"]
    assert uart.read(5, 1) & 0x61 == 0x60           # THRE | TEMT, no data ready
    uart.write(3, 1, 0x83)                          # DLAB
    uart.write(0, 1, 0x01)
    uart.write(1, 1, 0x00)
    assert (uart.read(0, 1), uart.read(1, 1)) == (1, 0)
    uart.write(3, 1, 0x03)
    uart.write(7, 1, 0x5A)
    assert uart.read(7, 1) == 0x5A
    uart.write(1, 1, 0x02)                          # enable THRE interrupt: raised at once
    assert irqs == [1] and uart.read(2, 1) & 0x0F == 0x02
    assert irqs == [1, 0]                           # reading IIR acknowledged it


def test_uart_receives_and_loops_back():
    uart = Uart16550(lambda data: None)
    uart.write(1, 1, 0x01)
    uart.receive(b"ok")
    assert uart.read(5, 1) & 1 and uart.read(2, 1) & 0x0F == 0x04
    assert (uart.read(0, 1), uart.read(0, 1)) == (ord("o"), ord("k"))
    assert not uart.read(5, 1) & 1
    uart.write(4, 1, 0x1F)                          # loopback, all outputs
    uart.write(0, 1, 0x42)
    assert uart.read(0, 1) == 0x42 and uart.read(6, 1) == 0xF0


def test_cmos_has_a_fixed_clock_and_the_memory_size():
    cmos = Cmos(64 << 20, 1 << 30)

    def get(register: int) -> int:
        cmos.write(0, 1, register | 0x80)           # bit 7: NMI mask, not part of the index
        return cmos.read(1, 1)
    assert [get(r) for r in (0x09, 0x08, 0x07, 0x04, 0x32)] == [0x24, 0x01, 0x01, 0x12, 0x20]
    assert get(0x0B) == 0x02 and get(0x0D) == 0x80
    assert get(0x17) | get(0x18) << 8 == 63 * 1024
    assert get(0x34) | get(0x35) << 8 == (48 << 20) >> 16
    assert get(0x5B) | get(0x5C) << 8 | get(0x5D) << 16 == (1 << 30) >> 16
    cmos.write(0, 1, 0x00)
    cmos.write(1, 1, 0x59)                          # the clock does not move
    assert get(0x00) == 0
    cmos.write(0, 1, 0x40)
    cmos.write(1, 1, 0x77)
    assert get(0x40) == 0x77


def test_debug_exit_status_and_test_devices():
    assert [status_of(v) for v in (0, 1, 3, 0x7F, 0x80)] == [1, 3, 7, 0xFF, 1]
    lines = []
    irq = IrqLines(lambda gsi, level: lines.append((gsi, level)))
    irq.write(10, 1, 1)
    irq.write(10, 1, 0x80)
    irq.write(3, 1, 0)
    assert lines == [(10, 1), (10, 1), (3, 0)] and irq.read(10, 1) == 1
    echo = Scratch(4)
    echo.write(0, 4, 0xDEADBEEF)
    assert (echo.read(0, 4), echo.read(0, 2), echo.read(2, 1)) == (0xDEADBEEF, 0xBEEF, 0xAD)


def test_buses_refuse_overlaps_and_find_devices():
    io = IoBus()
    echo = Scratch(4)
    io.register(0xE0, 4, echo, "echo")
    with pytest.raises(ValueError, match="already claimed by 'echo'"):
        io.register(0xE3, 2, Scratch(4))
    with pytest.raises(ValueError, match="0-0xffff"):
        io.register(0xFFFF, 2, Scratch(4))
    assert io.lookup(0xE2) == (0xE0, echo, "echo") and io.lookup(0xE4) is None
    mmio = MmioBus()
    mmio.register(0xD0000000, 0x1000, echo, "a")
    mmio.register(0xC0000000, 0x1000, echo, "b")
    with pytest.raises(ValueError, match="overlaps 'a'"):
        mmio.register(0xD0000800, 0x1000, echo)
    assert mmio.lookup(0xD0000FFF)[0] == 0xD0000000 and mmio.lookup(0xD0001000) is None
    assert mmio.lookup(0xC0000010)[2] == "b" and mmio.lookup(0x1000) is None


def test_machine_arguments_are_checked_before_kvm_is_touched():
    from pykvm.vmm import Machine
    with pytest.raises(MultibootError, match="no Multiboot header"):
        Machine(bytes(100))
    with pytest.raises(ValueError, match="cpus=0"):
        Machine(KERNEL, cpus=0)
    with pytest.raises(ValueError, match="cannot read it"):
        Machine("/nonexistent/kernel.elf")
    machine = Machine(KERNEL, memory=16)
    with pytest.raises(ValueError, match="overlaps RAM"):
        machine.add_mmio(0x800000, 0x1000, Scratch(4))
    with pytest.raises(ValueError, match="read\\(offset, size\\)"):
        machine.add_io(0x300, 1, object())
    with pytest.raises(ValueError, match="COM1"):
        machine.add_io(0x3F8, 1, Scratch(4))


def test_the_command_refuses_a_bad_kernel_with_status_1(tmp_path, capsys):
    from pykvm.boot import main
    bad = tmp_path / "bad.elf"
    bad.write_bytes(b"\x7fELF" + bytes(100))
    assert main([str(bad)]) == 1
    assert "MultibootError" in capsys.readouterr().err


def test_a_kernel_is_read_at_its_size_not_the_guests_ram(tmp_path):
    # read(n) allocates n bytes first: reading "RAM + 1" bytes of a 4 KiB kernel for a 1 TiB guest
    # was a MemoryError (seen in a 2 GiB host). Its size is what is read, and a size that changes
    # under the read is refused by name.
    import tracemalloc

    from pykvm.core.errors import InvalidArgument
    from pykvm.vmm.machine import _read

    kernel = tmp_path / "k.elf"
    kernel.write_bytes(b"\x7fELF" + bytes(4092))
    tracemalloc.start()
    try:
        name, data = _read(kernel, "kernel", 1 << 40)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (name, len(data)) == (str(kernel), 4096) and peak < 1 << 20
    with pytest.raises(InvalidArgument, match="more than the guest's RAM"):
        _read(kernel, "kernel", 4095)
