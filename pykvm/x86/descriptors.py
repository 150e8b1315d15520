"""Descriptors: the flat GDT pykvm's modes use, and IDT / IVT entries for handlers.

Why this exists: a guest that takes an exception needs a valid IDT, and a
hand-packed gate is easy to get wrong (the offset is split in three). Layouts
from the Intel SDM Vol. 3A chapters "Segment Descriptors", "IDT Descriptors"
and "64-Bit Mode IDT".
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

from ..core.errors import InvalidArgument
from ..core.state import Segment
from .system_area import SEL_CODE32, SEL_CODE64, SEL_DATA, SEL_TSS

TSS_LIMIT = 0x67
VECTORS = 256

GATE_INTERRUPT_32 = 0x8E    # present, DPL 0, 32-bit interrupt gate (64-bit in long mode)
GATE_TRAP_32 = 0x8F         # present, DPL 0, trap gate (IF left as it was)


def segment_descriptor(base: int, limit: int, access: int, flags: int) -> int:
    """An 8-byte segment descriptor: access byte (P/DPL/S/type) and flags nibble (G/DB/L)."""
    return ((limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (access << 40)
            | (((limit >> 16) & 0xF) << 48) | (flags << 52) | (((base >> 24) & 0xFF) << 56))


def gdt_bytes(tss: int) -> bytes:
    """The GDT pykvm's modes use: flat 32-bit code and data, 64-bit code, a busy TSS at ``tss``."""
    entries = [0] * (SEL_TSS // 8 + 2)
    entries[SEL_CODE32 // 8] = segment_descriptor(0, 0xFFFFF, 0x9B, 0xC)   # 32-bit code, 4 GiB
    entries[SEL_DATA // 8] = segment_descriptor(0, 0xFFFFF, 0x93, 0xC)     # data, 4 GiB
    entries[SEL_CODE64 // 8] = segment_descriptor(0, 0xFFFFF, 0x9B, 0xA)   # 64-bit code (L=1)
    entries[SEL_TSS // 8] = segment_descriptor(tss, TSS_LIMIT, 0x8B, 0)    # busy TSS
    entries[SEL_TSS // 8 + 1] = tss >> 32                                  # upper half (long mode)
    return struct.pack(f"<{len(entries)}Q", *entries)


def flat_segment(selector: int, tss: int) -> Segment:
    """The hidden-cache form of an entry of :func:`gdt_bytes` (what the CPU loads)."""
    if selector == SEL_TSS:
        return Segment(base=tss, limit=TSS_LIMIT, selector=selector, type=0xB, present=1, s=0)
    code64 = selector == SEL_CODE64
    return Segment(base=0, limit=0xFFFFFFFF, selector=selector,
                   type=0xB if selector in (SEL_CODE32, SEL_CODE64) else 0x3,
                   present=1, s=1, db=0 if code64 else 1, l=1 if code64 else 0, g=1)


def idt_gate(handler: int, selector: int, long_mode: bool, gate_type: int = GATE_INTERRUPT_32,
             ist: int = 0) -> bytes:
    """One IDT gate: 8 bytes (protected mode) or 16 bytes (long mode) pointing at ``handler``."""
    if not 0 <= handler < (1 << 64 if long_mode else 1 << 32):
        raise InvalidArgument(f"handler address {handler:#x} does not fit a "
                         f"{'64' if long_mode else '32'}-bit gate")
    if not 0 <= ist <= 7 or (ist and not long_mode):
        raise InvalidArgument(f"ist={ist}: an IST index is 1..7, and exists only in long mode")
    low = struct.pack("<HHBBH", handler & 0xFFFF, selector, ist, gate_type, handler >> 16 & 0xFFFF)
    return low + struct.pack("<II", handler >> 32, 0) if long_mode else low


def interrupt_table(handlers: Mapping[int, int], selector: int, long_mode: bool,
                    default_handler: int | None = None) -> bytes:
    """A 256-gate IDT: ``handlers[vector]``, else ``default_handler``, else a not-present gate.

    A vector delivered through a not-present gate raises #NP, and then #DF: the
    guest shuts down (KVM_EXIT_SHUTDOWN) unless those have handlers.
    """
    size = 16 if long_mode else 8
    table = bytearray(VECTORS * size)
    for vector in range(VECTORS):
        handler = handlers.get(vector, default_handler)
        if handler is not None:
            table[vector * size:(vector + 1) * size] = idt_gate(handler, selector, long_mode)
    return bytes(table)


def real_mode_vector_table(handlers: Mapping[int, int]) -> dict[int, bytes]:
    """IVT entries (offset, segment) for handlers at linear addresses below 1 MiB, by vector."""
    entries = {}
    for vector, handler in handlers.items():
        if not 0 <= handler < 0x100000:
            raise InvalidArgument(f"handlers[{vector}]={handler:#x}: a real-mode handler must lie "
                             f"below 1 MiB")
        entries[vector] = struct.pack("<HH", handler & 0xFFFF, handler >> 4 & 0xF000)
    return entries


def check_handlers(handlers: Mapping[int, int]) -> None:
    """Raise ValueError for a vector outside 0..255 or a handler that is not an address."""
    for vector, handler in handlers.items():
        if isinstance(vector, bool) or not isinstance(vector, int) or not 0 <= vector < VECTORS:
            raise InvalidArgument(f"handlers={{{vector!r}: ...}}: vectors are integers 0..255")
        if isinstance(handler, bool) or not isinstance(handler, int) or handler < 0:
            raise InvalidArgument(f"handlers[{vector}]={handler!r}: a handler is a guest address "
                             f"(an integer, e.g. image.symbols['my_handler'])")
