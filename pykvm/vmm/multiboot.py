"""Multiboot v1: find the header, parse an ELF32 image (or the a.out-kludge fields), build the boot information.

Why this exists: a Multiboot loader is the whole firmware of ``python -m
pykvm.boot``. :func:`parse` reads an image into segments and an entry point
and refuses a malformed one with a :class:`MultibootError` naming what is
wrong (truncated, wrong magic, bad checksum, overlapping segments, ...);
:func:`place` checks the image against the machine's memory and lays out the
information structure, the memory map, the command line and the modules.
Pure Python: no KVM needed, so the unit tests run anywhere.

The spec: https://www.gnu.org/software/grub/manual/multiboot/multiboot.html
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Sequence

from ..core.errors import PyKvmError

HEADER_MAGIC = 0x1BADB002
LOADER_MAGIC = 0x2BADB002           # EAX at entry
SEARCH_LIMIT = 8192                 # the header is 4-byte aligned within the first 8 KiB
FLAG_PAGE_ALIGN = 1 << 0            # modules on 4 KiB boundaries
FLAG_MEMORY_INFO = 1 << 1           # mem_lower/mem_upper (and the memory map) wanted
FLAG_VIDEO_MODE = 1 << 2            # a video mode wanted: ignored, there is no display
FLAG_ADDRESSES = 1 << 16            # the header's address fields ("a.out kludge") are valid
KNOWN_REQUIRED = FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO | FLAG_VIDEO_MODE
# Information structure flags
INFO_MEMORY, INFO_CMDLINE, INFO_MODS, INFO_MMAP, INFO_LOADER_NAME = 1 << 0, 1 << 2, 1 << 3, 1 << 6, 1 << 9
INFO_SIZE = 88                      # up to and including the VBE fields
# Where the loader puts its data: below the trampolines kernels like to put at 0x8000.
BOOT_AREA = 0x1000
BOOT_AREA_END = 0x8000
LOW_MEMORY_END = 0x9FC00            # usable conventional memory (the EBDA follows)
HOLE_END = 0x100000                 # VGA, option ROMs, BIOS: never RAM for the guest
PAGE = 4096
E820_RAM, E820_RESERVED, E820_ACPI, E820_NVS = 1, 2, 3, 4     # ACPI's address range types
# The ACPI area (pykvm.vmm.acpi writes it): the FACS in ACPI NVS memory, then the other tables in
# ACPI reclaim memory; below the BIOS area, in the hole the loader never uses.
ACPI_NVS = (0xE0000, 0x1000)
ACPI_TABLES = (0xE1000, 0xF000)
LOADER_NAME = b"pykvm\0"

_ELF32_HEADER = struct.Struct("<16sHHIIIIIHHHHHH")
_ELF32_PHDR = struct.Struct("<IIIIIIII")
_PT_LOAD = 1
_EM_386 = 3
_ET_EXEC = 2


class MultibootError(PyKvmError, ValueError):
    """The image is not a kernel this loader can boot; the message says what is wrong and where."""


@dataclasses.dataclass(frozen=True)
class Segment:
    """``data`` loaded at guest-physical ``address``, then zeros up to ``memory_size`` bytes."""

    address: int
    data: bytes
    memory_size: int

    @property
    def end(self) -> int:
        return self.address + self.memory_size


@dataclasses.dataclass(frozen=True)
class Image:
    """A parsed Multiboot kernel: what to load where, where to start, and the header's flags."""

    segments: tuple[Segment, ...]
    entry: int
    flags: int
    header_offset: int
    format: str                     # "elf" or "a.out kludge"

    @property
    def end(self) -> int:
        return max(segment.end for segment in self.segments)


@dataclasses.dataclass(frozen=True)
class Module:
    """A boot module (``--initrd``): its bytes and the string the kernel sees with it."""

    data: bytes
    cmdline: str = ""


@dataclasses.dataclass(frozen=True)
class BootLayout:
    """Everything to write into guest memory (fresh, zeroed RAM), and the registers' values, for one boot."""

    writes: tuple[tuple[int, bytes], ...]      # (address, bytes) for zeroed RAM: segments' bss is not in it
    entry: int
    info_address: int
    e820: tuple[tuple[int, int, int], ...]
    modules: tuple[tuple[int, int], ...]       # (start, end) of each module


def find_header(data: bytes, name: str = "kernel") -> tuple[int, int]:
    """(offset, flags) of the Multiboot header in ``data``."""
    if len(data) < 12:
        raise MultibootError(f"{name}: truncated: {len(data)} bytes, too short to hold a Multiboot "
                             f"header (12 bytes)")
    bad_checksum = None
    for offset in range(0, min(len(data), SEARCH_LIMIT) - 11, 4):
        magic, flags, checksum = struct.unpack_from("<III", data, offset)
        if magic != HEADER_MAGIC:
            continue
        if (magic + flags + checksum) & 0xFFFFFFFF == 0:
            return offset, flags
        bad_checksum = bad_checksum if bad_checksum is not None else (offset, flags, checksum)
    if bad_checksum is not None:
        offset, flags, checksum = bad_checksum
        raise MultibootError(f"{name}: Multiboot header at offset {offset:#x} has a wrong checksum "
                             f"{checksum:#010x} (magic + flags + checksum must be 0 mod 2^32; expected "
                             f"{-(HEADER_MAGIC + flags) & 0xFFFFFFFF:#010x})")
    if data[:4] == b"\x7fELF":
        what = "an ELF file without a Multiboot header"
    else:
        what = "no Multiboot header"
    raise MultibootError(f"{name}: {what}: magic {HEADER_MAGIC:#x} not found 4-byte aligned in the "
                         f"first {SEARCH_LIMIT} bytes (is it a Multiboot v1 kernel? Multiboot2 uses "
                         f"0xe85250d6, which this loader does not read)")


def parse(data: bytes, name: str = "kernel") -> Image:
    """Parse a Multiboot v1 kernel image: ELF32, or a binary with the header's address fields."""
    data = bytes(data)
    offset, flags = find_header(data, name)
    unknown = flags & 0xFFFF & ~KNOWN_REQUIRED
    if unknown:
        raise MultibootError(f"{name}: the Multiboot header requires features this loader does not "
                             f"know (flags bits {_bits(unknown)} of {flags:#010x}); a loader must refuse "
                             f"such a kernel")
    if flags & FLAG_ADDRESSES:
        segments, entry = _parse_addresses(data, offset, name)
        kind = "a.out kludge"
    elif data[:4] == b"\x7fELF":
        segments, entry = _parse_elf(data, name)
        kind = "elf"
    else:
        raise MultibootError(f"{name}: not an ELF file, and the Multiboot header (offset {offset:#x}) "
                             f"has no address fields (flag 16): there is no way to know where to load it")
    _check_overlaps(segments, name)
    if not any(s.address <= entry < s.address + max(len(s.data), 1) for s in segments):
        raise MultibootError(f"{name}: entry point {entry:#x} is outside every loaded segment "
                             f"({_describe(segments)})")
    return Image(tuple(segments), entry, flags, offset, kind)


def _parse_addresses(data: bytes, offset: int, name: str) -> tuple[list[Segment], int]:
    if offset + 32 > len(data):
        raise MultibootError(f"{name}: truncated: the Multiboot header at {offset:#x} sets flag 16 "
                             f"(address fields) but the file ends at {len(data):#x}, before them")
    header_addr, load_addr, load_end, bss_end, entry = struct.unpack_from("<5I", data, offset + 12)
    if header_addr < load_addr or header_addr - load_addr > offset:
        raise MultibootError(f"{name}: header_addr {header_addr:#x} and load_addr {load_addr:#x} are "
                             f"inconsistent with the header's file offset {offset:#x} (the file would "
                             f"start before its first byte)")
    file_start = offset - (header_addr - load_addr)
    if load_end == 0:
        load_end = load_addr + len(data) - file_start
    if load_end < load_addr:
        raise MultibootError(f"{name}: load_end_addr {load_end:#x} is below load_addr {load_addr:#x}")
    if file_start + (load_end - load_addr) > len(data):
        raise MultibootError(f"{name}: truncated: load_addr {load_addr:#x}..load_end_addr {load_end:#x} "
                             f"needs {load_end - load_addr} bytes from file offset {file_start:#x}, but the "
                             f"file has {len(data) - file_start}")
    if bss_end and bss_end < load_end:
        raise MultibootError(f"{name}: bss_end_addr {bss_end:#x} is below load_end_addr {load_end:#x}")
    text = data[file_start:file_start + load_end - load_addr]
    return [Segment(load_addr, text, max(bss_end, load_end) - load_addr)], entry


def _parse_elf(data: bytes, name: str) -> tuple[list[Segment], int]:
    if len(data) < _ELF32_HEADER.size:
        raise MultibootError(f"{name}: truncated: {len(data)} bytes, shorter than an ELF header")
    (ident, e_type, machine, _version, entry, phoff, _shoff, _flags, _ehsize, phentsize, phnum,
     *_rest) = _ELF32_HEADER.unpack_from(data)
    if ident[4] != 1:
        raise MultibootError(f"{name}: an ELF{64 if ident[4] == 2 else '?'} file; Multiboot v1 loads "
                             f"ELF32 images (link with -m elf_i386, or objcopy -O elf32-i386)")
    if ident[5] != 1:
        raise MultibootError(f"{name}: a big-endian ELF file; an x86 kernel is little-endian")
    if machine != _EM_386:
        raise MultibootError(f"{name}: ELF machine {machine}, not i386 (3)")
    if e_type != _ET_EXEC:
        raise MultibootError(f"{name}: ELF type {e_type}, not an executable (2): link the kernel")
    if phentsize != _ELF32_PHDR.size:
        raise MultibootError(f"{name}: ELF program header size {phentsize}, expected {_ELF32_PHDR.size}")
    if phoff + phnum * phentsize > len(data):
        raise MultibootError(f"{name}: truncated: {phnum} program headers at offset {phoff:#x} end past "
                             f"the file's {len(data)} bytes")
    segments = []
    physical_entry = None
    for index in range(phnum):
        p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, _pflags, _align = _ELF32_PHDR.unpack_from(
            data, phoff + index * phentsize)
        if p_type != _PT_LOAD or p_memsz == 0:
            continue
        if p_filesz > p_memsz:
            raise MultibootError(f"{name}: segment {index}: file size {p_filesz:#x} exceeds its memory "
                                 f"size {p_memsz:#x}")
        if p_offset + p_filesz > len(data):
            raise MultibootError(f"{name}: truncated: segment {index} (load address {p_paddr:#x}) needs "
                                 f"file bytes {p_offset:#x}..{p_offset + p_filesz:#x}, but the file ends at "
                                 f"{len(data):#x}")
        if p_paddr + p_memsz > 1 << 32:
            raise MultibootError(f"{name}: segment {index} ({p_paddr:#x}+{p_memsz:#x}) goes past 4 GiB")
        segments.append(Segment(p_paddr, data[p_offset:p_offset + p_filesz], p_memsz))
        if physical_entry is None and p_vaddr <= entry < p_vaddr + p_memsz:
            physical_entry = entry - p_vaddr + p_paddr     # as GRUB does for higher-half kernels
    if not segments:
        raise MultibootError(f"{name}: the ELF file has no loadable (PT_LOAD) segment")
    return segments, entry if physical_entry is None else physical_entry


def _check_overlaps(segments: Sequence[Segment], name: str) -> None:
    ordered = sorted(enumerate(segments), key=lambda item: item[1].address)
    for (i, first), (j, second) in zip(ordered, ordered[1:], strict=False):
        if second.address < first.end:
            raise MultibootError(f"{name}: segments {i} ({first.address:#x}-{first.end:#x}) and {j} "
                                 f"({second.address:#x}-{second.end:#x}) overlap")


def _describe(segments: Sequence[Segment]) -> str:
    return ", ".join(f"{s.address:#x}-{s.end:#x}" for s in segments)


def _bits(value: int) -> str:
    return ", ".join(str(bit) for bit in range(32) if value >> bit & 1)


# ---- the machine's memory map ------------------------------------------------------

LOW_RAM_LIMIT = 0xC0000000          # RAM above 3 GiB goes above 4 GiB (room for the APICs, MMIO)
HIGH_RAM_BASE = 1 << 32


def ram_ranges(memory: int) -> tuple[tuple[int, int], ...]:
    """(address, size) of the RAM: up to 3 GiB at 0, the rest at 4 GiB."""
    low = min(memory, LOW_RAM_LIMIT)
    return ((0, low),) + (((HIGH_RAM_BASE, memory - low),) if memory > low else ())


def e820_map(memory: int) -> tuple[tuple[int, int, int], ...]:
    """A PC's memory map: (address, length, type), with the hole below 1 MiB reserved or ACPI's."""
    (_, low), *high = ram_ranges(memory)
    entries = [(0, LOW_MEMORY_END, E820_RAM), (LOW_MEMORY_END, 0xA0000 - LOW_MEMORY_END, E820_RESERVED),
               (*ACPI_NVS, E820_NVS), (*ACPI_TABLES, E820_ACPI), (0xF0000, 0x10000, E820_RESERVED),
               (HOLE_END, low - HOLE_END, E820_RAM)]
    entries += [(address, size, E820_RAM) for address, size in high]
    return tuple(entries)


def place(image: Image, memory: int, cmdline: str = "", modules: Sequence[Module] = (),
          name: str = "kernel") -> BootLayout:
    """Check ``image`` against ``memory`` bytes of RAM and lay out the boot: what to write where."""
    (_, low), *_ = ram_ranges(memory)
    if memory < 2 << 20:
        raise MultibootError(f"memory={memory >> 20} MiB: a Multiboot machine needs at least 2 MiB")
    for index, segment in enumerate(image.segments):
        where = f"{name}: segment {index} ({segment.address:#x}-{segment.end:#x})"
        if segment.end > low:
            raise MultibootError(f"{where} is outside memory: RAM below 4 GiB ends at {low:#x} "
                                 f"({low >> 20} MiB); give the machine more memory")
        if segment.address < BOOT_AREA_END and segment.end > BOOT_AREA:
            raise MultibootError(f"{where} overlaps the loader's boot information area "
                                 f"{BOOT_AREA:#x}-{BOOT_AREA_END:#x}")
        if segment.address < HOLE_END and segment.end > LOW_MEMORY_END:
            raise MultibootError(f"{where} overlaps the hole below 1 MiB ({LOW_MEMORY_END:#x}-{HOLE_END:#x}: "
                                 f"EBDA, VGA, ROMs), which is not RAM in the memory map")
    if not image.entry < low:
        raise MultibootError(f"{name}: entry point {image.entry:#x} is outside memory (RAM ends at {low:#x})")
    # Only the file's bytes: the rest of each segment (its bss) is RAM's zeros, never a buffer here,
    # so a small image that claims gigabytes costs nothing before it runs.
    writes = [(segment.address, segment.data) for segment in image.segments if segment.data]
    # Modules: after the kernel, page-aligned, in order.
    placed = []
    cursor = _align(max(image.end, HOLE_END), PAGE)
    for index, module in enumerate(modules):
        end = cursor + len(module.data)
        if end > low:
            raise MultibootError(f"module {index} ({len(module.data)} bytes at {cursor:#x}) does not fit in "
                                 f"memory (RAM below 4 GiB ends at {low:#x}); give the machine more memory")
        writes.append((cursor, module.data))
        placed.append((cursor, end))
        cursor = _align(end, PAGE)
    # The boot area: info, memory map, module list, strings.
    area = bytearray()

    def put(blob: bytes, align: int = 4) -> int:
        area.extend(bytes(-len(area) % align))
        address = BOOT_AREA + INFO_SIZE + len(area)
        area.extend(blob)
        return address

    e820 = e820_map(memory)
    mmap_address = put(b"".join(struct.pack("<IQQI", 20, address, length, kind) for address, length, kind in e820))
    mmap_length = 24 * len(e820)
    strings = [put(_c_string(module.cmdline, f"module {index} command line"), 1)
               for index, module in enumerate(modules)]
    mods_address = put(b"".join(struct.pack("<IIII", start, end, string, 0)
                                for (start, end), string in zip(placed, strings, strict=True)), 16)
    cmdline_address = put(_c_string(cmdline, "command line"), 1)
    loader_address = put(LOADER_NAME, 1)
    if BOOT_AREA + INFO_SIZE + len(area) > BOOT_AREA_END:
        raise MultibootError(f"the command line and module strings take {len(area)} bytes, more than the "
                             f"boot information area holds ({BOOT_AREA_END - BOOT_AREA - INFO_SIZE}); "
                             f"shorten them")
    flags = INFO_MEMORY | INFO_CMDLINE | INFO_MMAP | INFO_LOADER_NAME | (INFO_MODS if modules else 0)
    mem_lower = LOW_MEMORY_END // 1024
    mem_upper = (low - HOLE_END) // 1024
    info = struct.pack("<IIIIIIIIIIIIIIIIIIIIII", flags, mem_lower, mem_upper, 0xFFFFFFFF, cmdline_address,
                       len(modules), mods_address if modules else 0, 0, 0, 0, 0, mmap_length, mmap_address,
                       0, 0, 0, loader_address, 0, 0, 0, 0, 0)
    writes.append((BOOT_AREA, info + bytes(area)))
    return BootLayout(tuple(writes), image.entry, BOOT_AREA, e820, tuple(placed))


def command_line(kernel: str, append: str = "") -> str:
    """The Multiboot command line for ``kernel`` booted with ``append``: ``"KERNEL APPEND"``.

    As QEMU's Multiboot loader makes it (observed with QEMU 7.2): the kernel's
    path as given to ``-kernel``, one space, then the ``-append`` text verbatim;
    the space stays when there is no ``-append`` (``"x86/dummy.flat "``).
    kvm-unit-tests and other Multiboot kernels take the first word as argv[0].
    """
    return f"{kernel} {append}"


def _c_string(text: str, what: str) -> bytes:
    try:
        encoded = text.encode("utf-8", "surrogateescape")     # a path's undecodable bytes go as they were
    except UnicodeEncodeError:
        raise MultibootError(f"{what} {text!r} is not encodable as UTF-8; pass text (or the path's own "
                             f"bytes as os.fsdecode gives them)") from None
    if b"\0" in encoded:
        raise MultibootError(f"{what} {text!r} contains a NUL byte, which would end it early")
    return encoded + b"\0"


def _align(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment
