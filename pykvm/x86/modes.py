"""CPU modes: put a vCPU straight into real, protected or long mode at an entry point.

Why this exists: a test wants "this vCPU, in long mode, at this RIP, with a
handler for #GP" in one call. The helpers write the GDT, TSS, IDT (or IVT) and
identity page tables into guest memory and load the matching segment and
control registers, so the guest starts directly in the requested mode (as the
KVM selftests do), with no boot code of its own.

Which guest-physical memory the helpers use is :mod:`pykvm.x86.system_area`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..core import checks
from ..core.errors import InvalidArgument
from ..core.state import DTable, Regs, Segment, Sregs
from ..core.vcpu import Vcpu
from .asm import Assembled, Mode, assemble, mode_of
from .descriptors import check_handlers, flat_segment, gdt_bytes, interrupt_table, real_mode_vector_table
from .paging import identity_page_tables
from .system_area import (
    DEFAULT_STACK_TOP,
    FREE_MEMORY,
    GDT,
    IDT,
    IVT,
    PML4,
    SEL_CODE32,
    SEL_CODE64,
    SEL_DATA,
    SEL_TSS,
    TSS,
)

if TYPE_CHECKING:
    from ..core.memory import GuestMemory

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

Handlers = Mapping[int, int]
CANONICAL_LOW_END = 1 << 47                   # 4-level paging: bits 63:47 all equal, so the lower half
CANONICAL_HIGH_START = (1 << 64) - (1 << 47)  # ends below 0x800000000000 and the upper half starts here


def _check_vcpu(vcpu: Vcpu) -> None:
    checks.instance("vcpu", vcpu, Vcpu, "the vCPU to put in the mode, e.g. vm.create_vcpu()")


def _canonical(name: str, address: int) -> int:
    """``address`` if it is a 64-bit canonical address (48-bit, 4-level paging), else a typed error."""
    checks.unsigned(name, address, 64, "a 64-bit linear address")
    if CANONICAL_LOW_END <= address < CANONICAL_HIGH_START:
        raise InvalidArgument(f"{name}={address:#x}: not canonical (with 4-level paging bits 63:47 must all "
                              f"equal bit 47; KVM would refuse the entry or the guest take #GP); use an address "
                              f"below {CANONICAL_LOW_END:#x} (the identity map covers 0..4 GiB)")
    return address


def write_system_tables(memory: GuestMemory, paging: bool) -> None:
    """GDT, a zeroed TSS and (with ``paging``) the identity page tables, into guest memory."""
    memory.write(GDT, gdt_bytes(TSS))
    memory.fill(TSS, 0x1000)
    if paging:
        for address, table in identity_page_tables(PML4).items():
            memory.write(address, table)


def _enter(vcpu: Vcpu, sregs: Sregs, rip: int, rsp: int) -> None:
    vcpu.sregs = sregs
    vcpu.regs = Regs(rip=rip, rsp=rsp, rflags=RFLAGS_RESERVED)


def enter_real_mode(vcpu: Vcpu, ip: int = 0, cs: int = 0x1000, sp: int = DEFAULT_STACK_TOP,
                    handlers: Handlers | None = None) -> None:
    """16-bit real mode at ``cs:ip``, data segments 0, SP=``sp``, IF=0, the IVT at 0.

    ``handlers`` maps vectors to handler addresses (linear, below 1 MiB); their
    IVT entries are written, the others are left as they are in memory.
    """
    _check_vcpu(vcpu)
    fix = "real-mode CS and IP are 16-bit: the code runs at CS * 16 + IP, so put the high part in CS"
    ip, cs = checks.unsigned("ip", ip, 16, fix), checks.unsigned("cs", cs, 16, fix)
    handlers = dict(handlers or {})
    check_handlers(handlers)
    for vector, entry in real_mode_vector_table(handlers).items():
        vcpu.vm.memory.write(IVT + 4 * vector, entry)
    sregs = vcpu.sregs
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(sregs, name, Segment(base=0, limit=0xFFFF, selector=0, type=0x3))
    sregs.cs = Segment(base=cs << 4, limit=0xFFFF, selector=cs, type=0xB)
    sregs.idt = DTable(base=IVT, limit=0x3FF)
    sregs.cr0 = (sregs.cr0 | CR0_ET) & ~(CR0_PE | CR0_PG)
    sregs.cr4 = 0
    sregs.efer = 0
    _enter(vcpu, sregs, ip, sp)


def enter_protected_mode(vcpu: Vcpu, eip: int, esp: int = DEFAULT_STACK_TOP,
                         handlers: Handlers | None = None, default_handler: int | None = None
                         ) -> None:
    """32-bit protected mode, flat 4 GiB segments, paging off, IF=0, a 256-gate IDT.

    ``handlers`` maps vectors to handler addresses (interrupt gates), the other
    vectors go to ``default_handler`` or have not-present gates.
    """
    _check_vcpu(vcpu)
    fix = "32-bit protected mode addresses 4 GiB: EIP and ESP are 32-bit"
    eip, esp = checks.unsigned("eip", eip, 32, fix), checks.unsigned("esp", esp, 32, fix)
    _write_idt(vcpu, handlers, default_handler, SEL_CODE32, long_mode=False)
    write_system_tables(vcpu.vm.memory, paging=False)
    sregs = _flat_sregs(vcpu, SEL_CODE32, idt_limit=256 * 8 - 1)
    sregs.cr0 = CR0_PE | CR0_ET | CR0_NE
    sregs.cr4 = 0
    sregs.efer = 0
    _enter(vcpu, sregs, eip, esp)


def enter_long_mode(vcpu: Vcpu, rip: int, rsp: int = DEFAULT_STACK_TOP,
                    handlers: Handlers | None = None, default_handler: int | None = None) -> None:
    """64-bit long mode with identity paging of 0..4 GiB (xAPIC page included), IF=0, a 256-gate IDT.

    ``handlers`` maps vectors to handler addresses (64-bit interrupt gates, IST
    0), the other vectors go to ``default_handler`` or have not-present gates.
    """
    _check_vcpu(vcpu)
    rip, rsp = _canonical("rip", rip), _canonical("rsp", rsp)
    _write_idt(vcpu, handlers, default_handler, SEL_CODE64, long_mode=True)
    write_system_tables(vcpu.vm.memory, paging=True)
    sregs = _flat_sregs(vcpu, SEL_CODE64, idt_limit=256 * 16 - 1)
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
    sregs.cr4 = CR4_PAE | CR4_OSFXSR
    sregs.cr3 = PML4
    sregs.efer = EFER_LME | EFER_LMA
    _enter(vcpu, sregs, rip, rsp)


def _write_idt(vcpu: Vcpu, handlers: Handlers | None, default_handler: int | None,
               selector: int, long_mode: bool) -> None:
    handlers = dict(handlers or {})
    check_handlers(handlers)
    if default_handler is not None:
        check_handlers({0: default_handler})
    vcpu.vm.memory.write(IDT, interrupt_table(handlers, selector, long_mode, default_handler))


def _flat_sregs(vcpu: Vcpu, code_selector: int, idt_limit: int) -> Sregs:
    sregs = vcpu.sregs
    sregs.cs = flat_segment(code_selector, TSS)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(sregs, name, flat_segment(SEL_DATA, TSS))
    sregs.tr = flat_segment(SEL_TSS, TSS)
    sregs.gdt = DTable(base=GDT, limit=len(gdt_bytes(TSS)) - 1)
    sregs.idt = DTable(base=IDT, limit=idt_limit)
    return sregs


def enter_mode(vcpu: Vcpu, mode: Mode | str, entry: int, handlers: Handlers | None = None) -> None:
    """Put ``vcpu`` in ``mode`` at ``entry`` (an IP offset in CS 0x1000 for real mode)."""
    mode = mode_of(mode)
    if mode == Mode.REAL:
        enter_real_mode(vcpu, entry, handlers=handlers)
    elif mode == Mode.PROTECTED:
        enter_protected_mode(vcpu, entry, handlers=handlers)
    else:
        enter_long_mode(vcpu, entry, handlers=handlers)


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


def load_code(vcpu: Vcpu, source: str, mode: Mode | str = Mode.LONG, entry: str | None = None,
              origin: int = FREE_MEMORY, handlers: Mapping[int, str | int] | None = None) -> Assembled:
    """Assemble ``source``, write it at ``origin``, and put ``vcpu`` in ``mode`` at ``entry``.

    ``entry`` is a label (default: the first byte); ``handlers`` maps vectors to
    labels or addresses. Real mode runs the code at CS:IP = ``origin >> 4``:0.
    Returns the assembled code with its symbols, so a test can compare RIPs with
    labels.
    """
    _check_vcpu(vcpu)
    mode = mode_of(mode)
    code = assemble(source, mode, 0 if mode == Mode.REAL else origin)
    vcpu.vm.memory.write(origin, code.code)

    def address(value: str | int) -> int:
        if isinstance(value, str):
            address = code.address(value)
            return origin + address if mode == Mode.REAL else address
        return value
    start = code.address(entry) if entry is not None else (0 if mode == Mode.REAL else origin)
    resolved = {vector: address(target) for vector, target in (handlers or {}).items()}
    if mode == Mode.REAL:
        enter_real_mode(vcpu, start, cs=origin >> 4, handlers=resolved)
    elif mode == Mode.PROTECTED:
        enter_protected_mode(vcpu, start, handlers=resolved)
    else:
        enter_long_mode(vcpu, start, handlers=resolved)
    return code
