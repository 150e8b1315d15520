"""Two questions about ELF files, answered without tools: a section's contents, and "static?".

Why this exists: the runner reads kernel modules' ``.modinfo`` (their
dependencies) and must tell a static busybox (it runs in the initramfs, with no
libraries) from a dynamic one, on machines that may lack binutils.
"""

from __future__ import annotations

import struct


def elf_section(image: bytes, name: str) -> bytes:
    """The contents of section ``name`` of a 64-bit little-endian ELF file."""
    if image[:4] != b"\x7fELF" or image[4] != 2 or image[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", image, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", image, 0x3A)

    def header(index: int) -> tuple[int, ...]:
        return struct.unpack_from("<IIQQQQIIQQ", image, shoff + index * shentsize)

    names = header(shstrndx)[4]
    for index in range(shnum):
        fields = header(index)
        start = names + fields[0]
        if image[start:image.index(b"\0", start)] == name.encode():
            return image[fields[4]:fields[4] + fields[5]]
    raise ValueError(f"no {name} section")


def is_static_elf(image: bytes) -> bool:
    """True for a 64-bit ELF executable without a program interpreter (statically linked)."""
    if image[:4] != b"\x7fELF" or image[4] != 2:
        return False
    phoff, = struct.unpack_from("<Q", image, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", image, 0x36)
    pt_interp = 3
    return all(struct.unpack_from("<I", image, phoff + i * phentsize)[0] != pt_interp
               for i in range(phnum))
