"""x86 architecture helpers: CPU modes, descriptor tables, page tables, vector names.

Why this exists: a test wants "this vCPU, in long mode, at this RIP" in one
call. The helpers here write the GDT, TSS and identity page tables into guest
memory at the addresses of :mod:`pykvm.layout` and load the matching segment
and control registers, so the guest starts directly in the requested mode (as
the KVM selftests do), with no boot code of its own.
"""

from __future__ import annotations

import enum
import struct
from typing import TYPE_CHECKING

from . import layout
from .asm import Mode
from .state import DTable, Regs, Segment, Sregs

if TYPE_CHECKING:
    from .memory import GuestMemory
    from .vcpu import Vcpu

CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_OSFXSR = 1 << 9
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
RFLAGS_RESERVED = 1 << 1
RFLAGS_TF = 1 << 8
RFLAGS_IF = 1 << 9

PTE_PRESENT = 1 << 0
PTE_WRITABLE = 1 << 1
PTE_LARGE = 1 << 7
LARGE_PAGE_SIZE = 2 << 20
IDENTITY_MAP_GIB = 4
XAPIC_BASE = 0xFEE00000


class Vector(enum.IntEnum):
    """Architectural exception vectors (mnemonics as in the Intel SDM)."""

    DE = 0    # divide error
    DB = 1    # debug
    NMI = 2   # non-maskable interrupt
    BP = 3    # breakpoint (INT3)
    OF = 4    # overflow (INTO)
    BR = 5    # BOUND range exceeded
    UD = 6    # invalid opcode
    NM = 7    # device not available
    DF = 8    # double fault
    TS = 10   # invalid TSS
    NP = 11   # segment not present
    SS = 12   # stack-segment fault
    GP = 13   # general protection
    PF = 14   # page fault
    MF = 16   # x87 floating-point error
    AC = 17   # alignment check
    MC = 18   # machine check
    XM = 19   # SIMD floating-point
    VE = 20   # virtualization exception
    CP = 21   # control protection


# Exceptions that push an error code in protected and long mode (never in real mode).
ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})
FIRST_EXTERNAL_VECTOR = 32


def vector_name(vector: int) -> str:
    """``#GP (13)`` for exceptions, ``NMI (2)``, ``vector 0x30`` for the rest."""
    if vector == Vector.NMI:
        return "NMI (2)"
    try:
        return f"#{Vector(vector).name} ({vector})"
    except ValueError:
        return f"vector {vector:#04x}"


# ---- descriptors ---------------------------------------------------------------
def _descriptor(base: int, limit: int, access: int, flags: int) -> int:
    """An 8-byte segment descriptor: access byte (P/DPL/S/type) and flags nibble (G/DB/L)."""
    return ((limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (access << 40)
            | (((limit >> 16) & 0xF) << 48) | (flags << 52) | (((base >> 24) & 0xFF) << 56))


_TSS_LIMIT = 0x67


def gdt_bytes() -> bytes:
    """The GDT pykvm's modes use (selectors in :mod:`pykvm.layout`)."""
    entries = [0] * (layout.SEL_TSS // 8 + 2)
    entries[layout.SEL_CODE32 // 8] = _descriptor(0, 0xFFFFF, 0x9B, 0xC)   # 32-bit code, 4 GiB
    entries[layout.SEL_DATA // 8] = _descriptor(0, 0xFFFFF, 0x93, 0xC)     # data, 4 GiB
    entries[layout.SEL_CODE64 // 8] = _descriptor(0, 0xFFFFF, 0x9B, 0xA)   # 64-bit code (L=1)
    entries[layout.SEL_TSS // 8] = _descriptor(layout.TSS, _TSS_LIMIT, 0x8B, 0)  # busy TSS
    entries[layout.SEL_TSS // 8 + 1] = layout.TSS >> 32                     # upper half (long mode)
    return struct.pack(f"<{len(entries)}Q", *entries)


def _segment_from_descriptor(selector: int) -> Segment:
    """The hidden-cache form of a GDT entry above (what the CPU loads)."""
    if selector == layout.SEL_TSS:
        return Segment(base=layout.TSS, limit=_TSS_LIMIT, selector=selector, type=0xB,
                       present=1, s=0)
    code64 = selector == layout.SEL_CODE64
    return Segment(base=0, limit=0xFFFFFFFF, selector=selector,
                   type=0xB if selector in (layout.SEL_CODE32, layout.SEL_CODE64) else 0x3,
                   present=1, s=1, db=0 if code64 else 1, l=1 if code64 else 0, g=1)


def identity_page_tables() -> dict[int, bytes]:
    """PML4, PDPT and page directories identity-mapping 0..4 GiB with 2 MiB pages."""
    tables = {layout.PML4: struct.pack("<Q", layout.PDPT | PTE_PRESENT | PTE_WRITABLE).ljust(4096, b"\0")}
    pdpt = [layout.PD + i * 4096 | PTE_PRESENT | PTE_WRITABLE for i in range(IDENTITY_MAP_GIB)]
    tables[layout.PDPT] = struct.pack(f"<{len(pdpt)}Q", *pdpt).ljust(4096, b"\0")
    for gib in range(IDENTITY_MAP_GIB):
        entries = [((gib * 512 + i) * LARGE_PAGE_SIZE) | PTE_PRESENT | PTE_WRITABLE | PTE_LARGE
                   for i in range(512)]
        tables[layout.PD + gib * 4096] = struct.pack("<512Q", *entries)
    return tables


def write_system_tables(memory: "GuestMemory", paging: bool) -> None:
    """GDT, a zeroed TSS and (with ``paging``) the identity page tables, into guest memory."""
    memory.write(layout.GDT, gdt_bytes())
    memory.fill(layout.TSS, 0x1000)
    if paging:
        for address, table in identity_page_tables().items():
            memory.write(address, table)


# ---- modes -------------------------------------------------------------------
def _enter(vcpu: "Vcpu", sregs: Sregs, rip: int, rsp: int) -> None:
    vcpu.sregs = sregs
    vcpu.regs = Regs(rip=rip, rsp=rsp, rflags=RFLAGS_RESERVED)


def enter_real_mode(vcpu: "Vcpu", ip: int = 0, cs: int = layout.REAL_MODE_CS,
                    sp: int = layout.STACK_TOP) -> None:
    """16-bit real mode at ``cs:ip``, all data segments 0, SP=``sp``, IF=0, IVT at 0."""
    sregs = vcpu.sregs
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(sregs, name, Segment(base=0, limit=0xFFFF, selector=0, type=0x3))
    sregs.cs = Segment(base=cs << 4, limit=0xFFFF, selector=cs, type=0xB)
    sregs.idt = DTable(base=layout.IVT, limit=0x3FF)
    sregs.cr0 = (sregs.cr0 | CR0_ET) & ~(CR0_PE | CR0_PG)
    sregs.cr4 = 0
    sregs.efer = 0
    _enter(vcpu, sregs, ip, sp)


def enter_protected_mode(vcpu: "Vcpu", eip: int, esp: int = layout.STACK_TOP) -> None:
    """32-bit protected mode, flat 4 GiB segments, paging off, IF=0."""
    write_system_tables(vcpu.vm.memory, paging=False)
    sregs = _flat_sregs(vcpu, layout.SEL_CODE32)
    sregs.cr0 = CR0_PE | CR0_ET | CR0_NE
    sregs.cr4 = 0
    sregs.efer = 0
    _enter(vcpu, sregs, eip, esp)


def enter_long_mode(vcpu: "Vcpu", rip: int, rsp: int = layout.STACK_TOP) -> None:
    """64-bit long mode with identity paging of 0..4 GiB (xAPIC page included), IF=0."""
    write_system_tables(vcpu.vm.memory, paging=True)
    sregs = _flat_sregs(vcpu, layout.SEL_CODE64)
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
    sregs.cr4 = CR4_PAE | CR4_OSFXSR
    sregs.cr3 = layout.PML4
    sregs.efer = EFER_LME | EFER_LMA
    _enter(vcpu, sregs, rip, rsp)


def _flat_sregs(vcpu: "Vcpu", code_selector: int) -> Sregs:
    sregs = vcpu.sregs
    sregs.cs = _segment_from_descriptor(code_selector)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(sregs, name, _segment_from_descriptor(layout.SEL_DATA))
    sregs.tr = _segment_from_descriptor(layout.SEL_TSS)
    sregs.gdt = DTable(base=layout.GDT, limit=len(gdt_bytes()) - 1)
    sregs.idt = DTable(base=layout.IDT, limit=0)
    return sregs


def enter_mode(vcpu: "Vcpu", mode: Mode | str, entry: int) -> None:
    """Put ``vcpu`` in ``mode`` at ``entry`` (an IP offset in CS 0x1000 for real mode)."""
    mode = Mode(mode)
    if mode == Mode.REAL:
        enter_real_mode(vcpu, entry)
    elif mode == Mode.PROTECTED:
        enter_protected_mode(vcpu, entry)
    else:
        enter_long_mode(vcpu, entry)


def cpu_mode(sregs: Sregs) -> Mode:
    """The mode the segment and control registers describe (compatibility mode counts as protected)."""
    if sregs.efer & EFER_LMA and sregs.cs.l:
        return Mode.LONG
    if sregs.cr0 & CR0_PE:
        return Mode.PROTECTED
    return Mode.REAL


def linear_rip(sregs: Sregs, rip: int) -> int:
    """The linear address of ``rip`` (CS base applies outside long mode)."""
    return rip if cpu_mode(sregs) == Mode.LONG else (sregs.cs.base + rip) & 0xFFFFFFFF
