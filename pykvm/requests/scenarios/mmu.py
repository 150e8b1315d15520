"""The MMU requests: TLB flushes, obsolete and unsynced roots, loading the root, dirty logging.

Why this exists: KVM keeps its own page tables for every guest (nested/extended
paging tables, or shadow copies of the guest's own tables when the hardware
cannot walk them), and whatever changes them or the guest's view of them (a
memslot change, dirty logging, a guest MOV to CR3 or CR4) leaves work for the
next entry: flush a TLB, build or load a root, resynchronise shadow pages. Each
scenario here makes one such change from a tiny long-mode guest or the host,
and shows what KVM did before the guest ran again: vCPU and VM stats-fd
counters, ``kvmmmu:`` trace events, what the guest read through its tables.
Whether a request is reachable depends on the paging mode of the host, which
is read live from the vendor module's parameters (:func:`two_dimensional_paging`).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import pykvm
from pykvm import x86
from pykvm.core.errors import KvmError
from pykvm.core.exits import HltExit, IoExit
from pykvm.core.memory import GuestMemory
from pykvm.core.vcpu import Vcpu
from pykvm.runtime import trace
from pykvm.x86.paging import LARGE_PAGE_SIZE, PAGE_SIZE, PTE_LARGE, PTE_PRESENT, PTE_WRITABLE
from pykvm.x86.system_area import PML4
from pykvm.x86.vectors import Vector

from .common import (
    DATA,
    EXTRA_SLOT_GPA,
    NO_EFFECT,
    OBSERVED,
    PORT_HANDLER,
    PORT_READY,
    SYS_MODULE,
    UNREACHABLE,
    ScenarioRecorder,
    ScenarioResult,
    is_on,
    is_port,
    machine,
    module_parameter,
    request,
    run_until,
)

CR4_SMEP = 1 << 20            # supervisor-mode execution prevention
CPUID7_EBX_SMEP = 1 << 7      # CPUID.(EAX=7,ECX=0):EBX, SMEP supported
# The vendor module parameter that turns two-dimensional paging on (AMD NPT, Intel EPT).
TDP_PARAMETERS = (("kvm_amd", "npt"), ("kvm_intel", "ept"))
PML_PARAMETER = ("kvm_intel", "pml")
ROOT_LEVEL = 4                # role.level of a 4-level root (role bits 0-3 of a kvm_mmu_get_page event)
ROLE_LEVEL_MASK = 0xF


def two_dimensional_paging(sys_module: Path = SYS_MODULE) -> str:
    """``"kvm_amd npt=Y"`` (or ``kvm_intel ept=Y``) when the loaded vendor module uses NPT/EPT, read now; else ""."""
    for module, name in TDP_PARAMETERS:
        value = module_parameter(module, name, sys_module)
        if is_on(value):
            return f"{module} {name}={value}"
    return ""


def shadow_paging_only(t: ScenarioRecorder) -> ScenarioResult | None:
    """UNREACHABLE (trigger and control alike) when guest MOV CR3 is not intercepted: KVM uses NPT/EPT here."""
    tdp = two_dimensional_paging()
    if not tdp:
        return None
    return t.unreachable(f"needs shadow paging: this host uses two-dimensional paging ({tdp}, read now), so a "
                         "guest MOV CR3 does not exit and KVM has no shadow roots for it (load kvm_amd with "
                         "npt=0 or kvm_intel with ept=0)")


def reported(vcpu: Vcpu, t: ScenarioRecorder) -> int:
    """The value the guest sends to PORT_READY next."""
    exit = run_until(vcpu, t, is_port(PORT_READY))
    assert isinstance(exit, IoExit)
    return exit.value


def root_lookups(recording: trace.Recording, gfns: set[int]) -> list[trace.TraceEvent]:
    """The ``kvm_mmu_get_page`` events of a 4-level root for one of ``gfns`` (a shadow root: the CR3 page)."""
    return [e for e in recording.named("kvmmmu:kvm_mmu_get_page")
            if e.fields.get("gfn") in gfns and e.fields.get("role", 0) & ROLE_LEVEL_MASK == ROOT_LEVEL]


# ---- MMU_FREE_OBSOLETE_ROOTS ----------------------------------------------------

ROOTS_GUEST = f"""
        mov ${EXTRA_SLOT_GPA:#x}, %rbx
        mov (%rbx), %rax                # touch the second slot: KVM maps it
        movq $1, (%rbx)
loop:   out %al, $0x10
        jmp loop
"""


def mmu_free_obsolete_roots(control: bool = False) -> ScenarioResult:
    """Deleting a memslot zaps all MMU pages fast and raises KVM_REQ_MMU_FREE_OBSOLETE_ROOTS: new roots next entry."""
    t = ScenarioRecorder("MMU_FREE_OBSOLETE_ROOTS", control)
    events = ("kvmmmu:kvm_mmu_zap_all_fast", "kvmmmu:kvm_mmu_get_page", "kvmmmu:kvm_mmu_prepare_zap_page")
    with machine() as (vm, vcpu):
        slot = vm.memory.add_slot(EXTRA_SLOT_GPA, 0x10000)
        t.host(f"second memory slot {slot.slot} at {EXTRA_SLOT_GPA:#x}; the guest reads and writes it")
        x86.load_code(vcpu, ROOTS_GUEST)
        run_until(vcpu, t, is_port(PORT_READY))
        with t.trace(*events) as recording, vm.stats.delta() as vm_delta, vcpu.stats.delta() as vcpu_delta:
            if not control:
                t.host(f"KVM_SET_USER_MEMORY_REGION slot {slot.slot} size 0: delete it while the vCPU exists")
                vm.memory.remove_slot(slot.slot)
            else:
                t.host("nothing (control)")
            run_until(vcpu, t, is_port(PORT_READY))
        t.stats("VM", vm_delta, ("mmu_shadow_zapped", "remote_tlb_flush", "remote_tlb_flush_requests"))
        t.stats("vCPU", vcpu_delta, ("tlb_flush", "pf_taken", "pf_fixed"))
        if recording is None:
            t.outcome.evidence.update(traced=False)
            return t.verdict(False, f"needs trace events ({t.trace_problem})")
        zaps = recording.named("kvmmmu:kvm_mmu_zap_all_fast")
        root_gfn = vcpu.sregs.cr3 >> 12
        pages = [e for e in recording.named("kvmmmu:kvm_mmu_get_page") if zaps and e.time >= zaps[0].time]
        # A shadow-paging root shadows the guest's CR3 page; a TDP (NPT/EPT) root is direct, at gfn 0.
        roots = [e for e in pages if e.fields.get("gfn") in (root_gfn, 0)]
        t.outcome.evidence.update(
            zap_all_fast=len(zaps),
            pages_after_zap=len(pages),
            new_roots=len(roots),
            first_new_root=roots[0].describe() if roots else None,
        )
        if zaps:
            t.guest(
                f"kvm_mmu_zap_all_fast in the ioctl made every root obsolete; at the next entry "
                f"a new root (gfn {roots[0].fields.get('gfn', 0) if roots else root_gfn:#x}) and "
                f"{max(len(pages) - 1, 0)} further page(s)"
                + (f" (MMU generation {roots[0].fields.get('mmu_valid_gen')})" if roots else "")
            )
        return t.verdict(
            bool(zaps) and bool(roots),
            "kvm_mmu_zap_all_fast at the deletion, then a new root (kvm_mmu_get_page for the "
            "CR3 page) at the next entry",
        )


# ---- TLB_FLUSH ------------------------------------------------------------------

TLB_GUEST = f"""
loop:   incq {DATA:#x}                 # dirty a page on every round
        out %al, $0x10
        jmp loop
"""


def tlb_flush(control: bool = False) -> ScenarioResult:
    """KVM_GET_DIRTY_LOG write-protects the logged pages and raises KVM_REQ_TLB_FLUSH on every vCPU."""
    t = ScenarioRecorder("TLB_FLUSH", control)
    with machine() as (vm, vcpu):
        x86.load_code(vcpu, TLB_GUEST)
        vm.memory.set_dirty_logging(0, True)
        t.host("KVM_SET_USER_MEMORY_REGION slot 0 with KVM_MEM_LOG_DIRTY_PAGES")
        run_until(vcpu, t, is_port(PORT_READY))
        with vm.stats.delta() as vm_delta, vcpu.stats.delta() as vcpu_delta:
            if not control:
                bitmap = vm.get_dirty_log(0)
                dirty = sum(bin(byte).count("1") for byte in bitmap)
                t.host(f"KVM_GET_DIRTY_LOG slot 0: {dirty} dirty pages (KVM raises KVM_REQ_TLB_FLUSH)")
            else:
                t.host("nothing (control)")
            run_until(vcpu, t, is_port(PORT_READY))
        vm_stats = t.stats("VM", vm_delta, ("remote_tlb_flush_requests", "remote_tlb_flush"))
        vcpu_stats = t.stats("vCPU", vcpu_delta, ("tlb_flush",))
        t.outcome.evidence.update(vm_stats, **vcpu_stats)
        return t.verdict(
            vm_stats.get("remote_tlb_flush_requests", 0) >= 1 and vcpu_stats["tlb_flush"] >= 1,
            "VM remote_tlb_flush_requests and vCPU tlb_flush counted",
        )



# ---- TLB_FLUSH_CURRENT ----------------------------------------------------------

CR4_GUEST = f"""
        out %al, ${PORT_READY:#x}       # ready: the host reads the counters from here
        mov %cr4, %rax
        or ${CR4_SMEP:#x}, %rax
        mov %rax, %cr4                  # intercepted: kvm_set_cr4(), then kvm_post_set_cr4()
        out %al, ${PORT_READY:#x}
        out %al, ${PORT_READY:#x}       # one more entry: a host that emulates the guest services it here
        hlt
gp:     out %al, ${PORT_HANDLER:#x}     # #GP: this host refuses CR4.SMEP
        hlt
"""


def smep_in_cpuid(vm: pykvm.Vm) -> bool:
    """Does KVM_GET_SUPPORTED_CPUID offer SMEP (leaf 7, subleaf 0, EBX bit 7)?"""
    return any(e.function == 7 and e.index == 0 and e.ebx & CPUID7_EBX_SMEP for e in vm.kvm.supported_cpuid)


def tlb_flush_current(control: bool = False) -> ScenarioResult:
    """The guest sets CR4.SMEP: kvm_post_set_cr4() raises KVM_REQ_TLB_FLUSH_CURRENT.

    The control runs the same guest with SMEP already set (KVM_SET_SREGS), so its
    MOV to CR4 exits alike but changes nothing.
    """
    t = ScenarioRecorder("TLB_FLUSH_CURRENT", control)
    with machine() as (vm, vcpu):
        x86.load_code(vcpu, CR4_GUEST, handlers={Vector.GP: "gp"})
        offered = smep_in_cpuid(vm)
        cpuid = f"KVM_GET_SUPPORTED_CPUID leaf 7 SMEP bit: {'set' if offered else 'clear'}"
        if control:
            sregs = vcpu.sregs
            sregs.cr4 |= CR4_SMEP
            try:
                vcpu.sregs = sregs
            except KvmError as exc:
                return t.unreachable(f"needs CR4.SMEP: KVM_SET_SREGS refused it ({exc}; {cpuid})")
            t.host(f"KVM_SET_SREGS: CR4.SMEP already set ({sregs.cr4:#x}) (control)")
        run_until(vcpu, t, is_port(PORT_READY))     # after the first entry, whose own flush is not counted
        before = vcpu.sregs.cr4
        with vcpu.stats.delta() as delta:
            t.guest(f"MOV to CR4 {before:#x} -> {before | CR4_SMEP:#x}")
            exit = run_until(vcpu, t, lambda e: is_port(PORT_READY)(e) or is_port(PORT_HANDLER)(e))
            if is_port(PORT_HANDLER)(exit):
                return t.unreachable(f"needs CR4.SMEP: the guest's MOV to CR4 raised #GP ({cpuid})")
            run_until(vcpu, t, is_port(PORT_READY))
        after = vcpu.sregs.cr4
        stats = t.stats("vCPU", delta, ("tlb_flush", "exits", "insn_emulation"))
        t.outcome.evidence.update(stats, cr4_before=before, cr4_after=after, smep_in_cpuid=offered)
        t.guest(f"KVM_GET_SREGS: CR4 {before:#x} -> {after:#x}")
        return t.verdict(stats.get("tlb_flush", 0) >= 1,
                         "CR4.SMEP 0 -> 1, then vCPU tlb_flush +1 before the guest ran again "
                         "(kvm_vcpu_flush_tlb_current)")


# ---- MMU_SYNC -------------------------------------------------------------------

# A 4 KiB mapping of SYNC_VA (4 GiB, PDPT entry 4 of the identity tables) through a
# page table the guest rewrites: OLD_PAGE first, then NEW_PAGE.
SYNC_VA = 4 << 30
SYNC_PD, SYNC_PT, OLD_PAGE, NEW_PAGE = 0x30000, 0x31000, 0x32000, 0x33000
OLD_VALUE, NEW_VALUE = 0x01D, 0x2E3
SYNC_EVENTS = ("kvmmmu:kvm_mmu_unsync_page", "kvmmmu:kvm_mmu_sync_page")


def sync_guest(reload_cr3: bool) -> str:
    """Read through the 4 KiB table, remap the page without a flush, read, reload CR3 (or not), read."""
    return f"""
        mov ${SYNC_VA:#x}, %rbx
        mov (%rbx), %eax                # KVM shadows the 4 KiB table to translate this
        out %eax, ${PORT_READY:#x}
        movq ${NEW_PAGE | PTE_PRESENT | PTE_WRITABLE:#x}, {SYNC_PT:#x}   # remap, no INVLPG
        mov (%rbx), %eax                # the old page is still allowed here (no flush yet)
        out %eax, ${PORT_READY:#x}
        mov %cr3, %rcx
        {"mov %rcx, %cr3                 # the flush: KVM_REQ_MMU_SYNC" if reload_cr3 else "nop"}
        mov (%rbx), %eax
        out %eax, ${PORT_READY:#x}
        hlt
"""


def write_sync_tables(memory: GuestMemory) -> None:
    memory.write(PML4 + PAGE_SIZE + 8 * (SYNC_VA >> 30), struct.pack("<Q", SYNC_PD | PTE_PRESENT | PTE_WRITABLE))
    memory.write(SYNC_PD, struct.pack("<Q", SYNC_PT | PTE_PRESENT | PTE_WRITABLE))
    memory.write(SYNC_PT, struct.pack("<Q", OLD_PAGE | PTE_PRESENT | PTE_WRITABLE))
    memory.write(OLD_PAGE, struct.pack("<I", OLD_VALUE))
    memory.write(NEW_PAGE, struct.pack("<I", NEW_VALUE))


def mmu_sync(control: bool = False) -> ScenarioResult:
    """A guest MOV CR3 under shadow paging: kvm_invalidate_pcid() raises KVM_REQ_MMU_SYNC (and TLB_FLUSH_CURRENT)."""
    t = ScenarioRecorder("MMU_SYNC", control)
    unreachable = shadow_paging_only(t)
    if unreachable is not None:
        return unreachable
    with machine() as (vm, vcpu):
        x86.load_code(vcpu, sync_guest(reload_cr3=not control))
        write_sync_tables(vm.memory)
        t.host(f"guest tables map {SYNC_VA:#x} with a 4 KiB page table at {SYNC_PT:#x}")
        reads = [reported(vcpu, t)]
        with t.trace(*SYNC_EVENTS) as recording, vcpu.stats.delta() as delta, vm.stats.delta() as vm_delta:
            t.guest(f"writes the PTE: {SYNC_VA:#x} -> {NEW_PAGE:#x}, no INVLPG")
            reads.append(reported(vcpu, t))
            t.guest("MOV CR3, the same value: a TLB flush" if not control else "no MOV CR3 (control)")
            reads.append(reported(vcpu, t))
            run_until(vcpu, t, lambda exit: isinstance(exit, HltExit))   # one more entry
        stats = t.stats("vCPU", delta, ("tlb_flush",))
        vm_stats = t.stats("VM", vm_delta, ("mmu_pte_write", "mmu_unsync"))   # mmu_unsync: pages unsync now
        t.guest("read " + ", ".join(f"{value:#x}" for value in reads) + f" (old page {OLD_VALUE:#x}, "
                f"new {NEW_VALUE:#x})")
        t.outcome.evidence.update(stats, **vm_stats, reads=reads)
        if recording is None:
            t.outcome.evidence.update(traced=False)
            return t.verdict(False, f"needs trace events ({t.trace_problem})")
        table_gfn = SYNC_PT // PAGE_SIZE
        unsynced = [e for e in recording.named("kvmmmu:kvm_mmu_unsync_page") if e.fields.get("gfn") == table_gfn]
        synced = [e for e in recording.named("kvmmmu:kvm_mmu_sync_page") if e.fields.get("gfn") == table_gfn]
        t.outcome.evidence.update(unsync_pages=len(unsynced), sync_pages=len(synced))
        if synced:
            return t.verdict(True, "kvm_mmu_unsync_page when the guest wrote its page table, then "
                                   "kvm_mmu_sync_page for it at the entry after MOV CR3 (kvm_mmu_sync_roots)")
        return t.verdict(False, "raised by MOV CR3 (its companion TLB_FLUSH_CURRENT counted "
                                f"tlb_flush +{stats.get('tlb_flush', 0)}), but no shadow page was unsync, so "
                                "kvm_mmu_sync_roots had nothing to do: KVM emulated the guest's PTE write "
                                f"(VM mmu_pte_write +{vm_stats.get('mmu_pte_write', 0)}) instead of letting it "
                                f"write an unsync table; the guest read {reads[1]:#x} right after its write")


# ---- LOAD_MMU_PGD ---------------------------------------------------------------

# Five roots (PML4, PDPT, PD): each maps the identity PDPT at 0 and ROOT_VA to its own 2 MiB page,
# whose first word is the root's number, so the guest reads which root translates for it.
ROOTS = tuple(0x40000 + i * 3 * PAGE_SIZE for i in range(5))
ROOT_VA = 1 << 39                      # PML4 entry 1
SEQUENCE = DATA                        # the CR3 values the guest loads, 0-terminated
SWITCHES = 8
CACHED_SEQUENCE = (1, 0) * (SWITCHES // 2)                        # two roots: each switch finds its root cached
UNCACHED_SEQUENCE = tuple((i + 1) % len(ROOTS) for i in range(SWITCHES))   # five: more than KVM caches (1 + 3)


def root_page(index: int) -> int:
    return (2 + index) * LARGE_PAGE_SIZE


def write_roots(memory: GuestMemory) -> None:
    identity = struct.pack("<Q", PML4 + PAGE_SIZE | PTE_PRESENT | PTE_WRITABLE)
    for index, pml4 in enumerate(ROOTS):
        pdpt, pd = pml4 + PAGE_SIZE, pml4 + 2 * PAGE_SIZE
        memory.write(pml4, identity + struct.pack("<Q", pdpt | PTE_PRESENT | PTE_WRITABLE))
        memory.write(pdpt, struct.pack("<Q", pd | PTE_PRESENT | PTE_WRITABLE))
        memory.write(pd, struct.pack("<Q", root_page(index) | PTE_PRESENT | PTE_WRITABLE | PTE_LARGE))
        memory.write(root_page(index), struct.pack("<I", index))


PGD_GUEST = f"""
        mov ${ROOTS[0]:#x}, %rax
        mov %rax, %cr3
        mov ${ROOT_VA:#x}, %rbx
        mov ${SEQUENCE:#x}, %rsi
        mov (%rbx), %eax
        out %eax, ${PORT_READY:#x}
next:   lodsq                           # the next CR3, 0 at the end
        test %rax, %rax
        jz done
        mov %rax, %cr3
        mov (%rbx), %eax                # which root translates now
        out %eax, ${PORT_READY:#x}
        jmp next
done:   hlt
"""


def load_mmu_pgd(control: bool = False) -> ScenarioResult:
    """MOV CR3 to a root KVM has cached: kvm_mmu_new_pgd() reuses it and raises KVM_REQ_LOAD_MMU_PGD."""
    t = ScenarioRecorder("LOAD_MMU_PGD", control)
    unreachable = shadow_paging_only(t)
    if unreachable is not None:
        return unreachable
    sequence = UNCACHED_SEQUENCE if control else CACHED_SEQUENCE
    with machine() as (vm, vcpu):
        x86.load_code(vcpu, PGD_GUEST)
        write_roots(vm.memory)
        vm.memory.write(SEQUENCE, struct.pack(f"<{len(sequence) + 1}Q", *(ROOTS[i] for i in sequence), 0))
        t.host(f"{len(ROOTS)} guest roots at " + ", ".join(f"{root:#x}" for root in ROOTS))
        run_until(vcpu, t, is_port(PORT_READY))
        t.guest(f"{SWITCHES} MOV CR3 through roots {', '.join(str(i) for i in sequence)}"
                + (": more roots than KVM caches (control)" if control else ": two roots, KVM caches both"))
        with t.trace("kvmmmu:kvm_mmu_get_page") as recording:
            reads = [reported(vcpu, t) for _ in sequence]
        t.outcome.evidence.update(reads=reads, expected_reads=list(sequence))
        if recording is None:
            t.outcome.evidence.update(traced=False)
            return t.verdict(False, f"needs trace events ({t.trace_problem})")
        lookups = root_lookups(recording, {root // PAGE_SIZE for root in ROOTS})
        cached = SWITCHES - len(lookups)
        t.outcome.evidence.update(switches=SWITCHES, root_lookups=len(lookups), cached_loads=cached)
        t.guest(f"{SWITCHES} switches: KVM looked a root up (kvm_mmu_get_page) {len(lookups)} times; "
                f"{cached} switches loaded a cached root; the guest read roots {reads}")
        return t.verdict(cached >= 1 and reads == list(sequence),
                         "switches to a cached root built no root (no kvm_mmu_get_page) yet the guest "
                         "translated through the new root: kvm_mmu_load_pgd() loaded it at the entry")


# ---- UPDATE_CPU_DIRTY_LOGGING ---------------------------------------------------

PML_REGION, PML_PAGES = 0x400000, 1536      # 6 MiB: three times the 512 entries of the PML buffer
PML_GUEST = f"""
round:  mov ${PML_REGION:#x}, %rbx
        mov ${PML_PAGES}, %ecx
dirty:  incq (%rbx)                     # one write to each 4 KiB page
        add ${PAGE_SIZE:#x}, %rbx
        loop dirty
        out %al, ${PORT_READY:#x}
        jmp round
"""


def update_cpu_dirty_logging(control: bool = False) -> ScenarioResult:
    """The first slot to log dirty pages makes KVM raise KVM_REQ_UPDATE_CPU_DIRTY_LOGGING (kvm_intel with PML).

    Elsewhere it is unreachable, with kvm_intel's ``pml`` parameter read now.
    """
    t = ScenarioRecorder("UPDATE_CPU_DIRTY_LOGGING", control)
    module, name = PML_PARAMETER
    pml = module_parameter(module, name)
    if pml is None:
        return t.unreachable(f"needs Intel PML: no /sys/module/{module}/parameters/{name} (read now), so "
                             f"{module} is not loaded; this host's dirty logging write-protects pages instead")
    if not is_on(pml):
        return t.unreachable(f"needs Intel PML: {module} {name}={pml} (read now)")
    with machine() as (vm, vcpu):
        x86.load_code(vcpu, PML_GUEST)
        run_until(vcpu, t, is_port(PORT_READY))
        t.guest(f"wrote each of {PML_PAGES} pages at {PML_REGION:#x}: KVM maps them all writable")
        with t.trace("kvm:kvm_pml_full") as recording, vcpu.stats.delta() as delta:
            if control:
                t.host("nothing (control)")
            else:
                vm.memory.set_dirty_logging(0, True)
                t.host("KVM_SET_USER_MEMORY_REGION slot 0 with KVM_MEM_LOG_DIRTY_PAGES: the first slot that logs")
            t.guest(f"writes the {PML_PAGES} pages again")
            run_until(vcpu, t, is_port(PORT_READY))
        stats = t.stats("vCPU", delta, ("exits", "pf_taken"))
        t.outcome.evidence.update(stats, pml=pml)
        if not control:
            bitmap = vm.get_dirty_log(0)
            first = PML_REGION // PAGE_SIZE
            dirty = sum(bitmap[page // 8] >> (page % 8) & 1 for page in range(first, first + PML_PAGES))
            t.outcome.evidence.update(dirty_pages=dirty)
            t.host(f"KVM_GET_DIRTY_LOG slot 0: {dirty} of the {PML_PAGES} pages dirty")
        if recording is None:
            t.outcome.evidence.update(traced=False)
            return t.verdict(False, f"needs trace events ({t.trace_problem})")
        full = recording.count("kvm:kvm_pml_full")
        t.outcome.evidence.update(pml_full=full)
        return t.verdict(full >= 1, "PML-full exits (kvm:kvm_pml_full) while the guest dirtied the logged pages: "
                                    "the request turned page-modification logging on in the VMCS")

REQUESTS = (
    request(
        "TLB_FLUSH",
        "KVM_GET_DIRTY_LOG, MMU notifiers, memslot changes (kvm_flush_remote_tlbs)",
        "kvm_vcpu_flush_tlb_all()",
        "KVM_MEM_LOG_DIRTY_PAGES on slot 0; KVM_GET_DIRTY_LOG",
        "VM stat remote_tlb_flush_requests, vCPU stat tlb_flush",
        "When KVM removes or write-protects guest mappings, stale translations may stay in every CPU's TLB; "
        "KVM_REQ_TLB_FLUSH (with a kick) makes each vCPU flush all its guest TLB entries before it runs again.",
        OBSERVED,
        OBSERVED,
        intel=OBSERVED,
    ),
    request(
        "TLB_FLUSH_CURRENT",
        "kvm_post_set_cr4() (CR4.SMEP 0 -> 1, CR4.PAE toggled), kvm_invalidate_pcid() (MOV CR3 and INVPCID "
        "under shadow paging), kvm_mmu_new_pgd() with flush_on_reuse, nested VM entry/exit",
        "kvm_service_local_tlb_flush_requests() -> kvm_vcpu_flush_tlb_current()",
        "the guest sets CR4.SMEP with MOV to CR4 (control: the same write with SMEP already set by KVM_SET_SREGS)",
        "vCPU stat tlb_flush +1 at the next entry (0 in the control); CR4 read back with KVM_GET_SREGS",
        "A guest TLB may hold translations that a change of paging state made wrong, but only for the "
        "address space the vCPU runs in now: KVM_REQ_TLB_FLUSH_CURRENT flushes just the current root's "
        "entries (the current ASID on AMD, the current EPTP/VPID context on Intel), cheaper than "
        "KVM_REQ_TLB_FLUSH. x86.c makes it in kvm_post_set_cr4() when a MOV to CR4 sets SMEP (translations "
        "cached while supervisor code could run user pages must go) or toggles PAE, and in "
        "kvm_invalidate_pcid() when, under shadow paging, the guest flushes its own TLB with MOV CR3 or "
        "INVPCID; vcpu_enter_guest() services it in kvm_vcpu_flush_tlb_current(), which counts vCPU stat "
        "tlb_flush (the stat also counts the full and guest flushes, which this trigger does not raise). "
        "SVM intercepts CR4 writes even with NPT, so the trigger works on kvm_amd as on kvm_pvm; kvm_pvm "
        "accepts SMEP although its KVM_GET_SUPPORTED_CPUID leaf 7 does not offer it.",
        OBSERVED,
        OBSERVED,
        intel=OBSERVED,
    ),
    request(
        "MMU_FREE_OBSOLETE_ROOTS",
        "memslot deletion/move (kvm_mmu_zap_all_fast), role changes",
        "kvm_mmu_free_obsolete_roots()",
        "delete a populated memslot while the vCPU exists",
        "trace kvm_mmu_zap_all_fast, then kvm_mmu_get_page at the next entry",
        "Deleting a memslot must not leave any vCPU translating through pages that mapped it. KVM bumps the "
        "MMU generation (kvm_mmu_zap_all_fast) so every existing root is obsolete, and raises "
        "KVM_REQ_MMU_FREE_OBSOLETE_ROOTS on all vCPUs: each drops its obsolete roots before entering, and the "
        "entry builds a fresh root (kvm_mmu_get_page) that knows only the remaining slots. The zap is lazy "
        "(no walk of the old tables under the lock); the request is what makes it safe.",
        OBSERVED,
        OBSERVED,
        intel=OBSERVED,
    ),
    request(
        "MMU_SYNC",
        "kvm_invalidate_pcid() (guest MOV CR3 or INVPCID under shadow paging), kvm_mmu_new_pgd() with "
        "flush_on_reuse, nested transitions with shadowed tables",
        "kvm_mmu_sync_roots()",
        "a 4 KiB guest page table, the guest remaps a page in it without INVLPG, then reloads CR3 (control: "
        "no reload)",
        "trace kvmmmu:kvm_mmu_unsync_page at the PTE write, kvmmmu:kvm_mmu_sync_page for that table after "
        "MOV CR3; what the guest reads before and after",
        "Under shadow paging KVM write-protects the guest's page tables so its shadow copies stay exact, "
        "except last-level tables it lets go \"unsync\": the guest writes them freely (no exit per PTE), "
        "which the architecture allows because the guest must flush its TLB before relying on the new "
        "entry. That flush (MOV CR3 or INVPCID, kvm_invalidate_pcid() in x86.c) raises KVM_REQ_MMU_SYNC; "
        "vcpu_enter_guest() calls kvm_mmu_sync_roots() (mmu/mmu.c), which walks the roots for unsync "
        "children and re-reads each one from guest memory (kvm_mmu_sync_page). With NPT/EPT there are "
        "no shadow pages and a guest MOV CR3 does not exit: kvm_amd's default npt=Y makes it unreachable "
        "(the scenario reads the parameter now). kvm_pvm shadows the tables and the MOV CR3 raises it "
        "(its companion TLB_FLUSH_CURRENT counts tlb_flush +1), but kvm_pvm runs this guest's code in "
        "KVM's emulator: the PTE write is emulated (VM stat mmu_pte_write +1, the new page is read at "
        "once, no stale translation), no shadow page goes unsync, and kvm_mmu_sync_roots() has nothing "
        "to do. With kvm_amd loaded with npt=0 (tcg-amd --kvm-amd-parameters npt=0): observed, "
        "kvm_mmu_unsync_page at the PTE write and kvm_mmu_sync_page after MOV CR3, and the guest saw the "
        "architecture's stale entry: it read the old page after the write and the new one only after the "
        "MOV CR3 (the control read the old page three times, its table still unsync).",
        NO_EFFECT,
        UNREACHABLE,
        needs="shadow paging (kvm_amd npt=0, kvm_intel ept=0, or kvm_pvm)",
        amd_shadow=OBSERVED,
        intel=UNREACHABLE,
    ),
    request(
        "LOAD_MMU_PGD",
        "kvm_mmu_new_pgd() when the new CR3's root is cached (fast_pgd_switch), load_pdptrs() (PAE paging), "
        "kvm_set_cr3() when only CR3's LAM bits change, nested transitions",
        "kvm_mmu_load_pgd()",
        "the guest switches CR3 8 times between two roots (control: 8 switches through five roots, more "
        "than KVM caches)",
        "trace kvmmmu:kvm_mmu_get_page of 4-level roots: one lookup for 8 switches (8 in the control); the "
        "guest reads, through each root, the marker page only that root maps",
        "KVM keeps the current root and up to three previous roots (prev_roots) per MMU. When the guest "
        "loads a CR3 whose shadow root is among them, kvm_mmu_new_pgd() (mmu/mmu.c) swaps it in without "
        "building anything and raises KVM_REQ_LOAD_MMU_PGD; at the next entry kvm_mmu_load_pgd() writes "
        "that root into the hardware (CR3 under shadow paging, nCR3 or EPTP otherwise). Without a cached "
        "root KVM frees the current one and kvm_mmu_load() looks a root up (kvm_mmu_get_page) instead, "
        "with no request. So the evidence is a switch that built no root while the guest went on "
        "translating through the new one; the control rotates through five roots so that every switch "
        "misses the cache. load_pdptrs() also raises it for PAE guests. kvm_pvm: observed (7 of 8 "
        "switches loaded a cached root; 8 lookups in the control). kvm_amd with its default npt=Y: a guest "
        "MOV CR3 does not exit, so it is unreachable (parameter read now). With npt=0 (tcg-amd "
        "--kvm-amd-parameters npt=0): observed, the same figures, the guest translating in hardware "
        "through each root.",
        OBSERVED,
        UNREACHABLE,
        needs="shadow paging (kvm_amd npt=0, kvm_intel ept=0, or kvm_pvm)",
        amd_shadow=OBSERVED,
        intel=UNREACHABLE,
    ),
    request(
        "UPDATE_CPU_DIRTY_LOGGING",
        "kvm_mmu_update_cpu_dirty_logging() (x86.c) when the first memslot starts dirty logging or the "
        "last one stops, only where the vendor module logs writes in hardware (cpu_dirty_log_size)",
        "vmx_update_cpu_dirty_logging()",
        "the guest dirties 1536 mapped pages after the host sets KVM_MEM_LOG_DIRTY_PAGES on slot 0 "
        "(control: no logging); kvm_intel with pml=Y only",
        "trace kvm:kvm_pml_full (PML-full exits), vCPU pf_taken, KVM_GET_DIRTY_LOG; elsewhere "
        "/sys/module/kvm_intel/parameters/pml read now",
        "Intel's page-modification logging (PML) lets the CPU record the guest-physical address of each "
        "page it dirties in a 512-entry buffer, instead of KVM write-protecting every logged page and "
        "taking a fault per first write. The PML enable bit lives in each vCPU's VMCS, so when dirty "
        "logging starts or stops on a VM KVM raises KVM_REQ_UPDATE_CPU_DIRTY_LOGGING on every vCPU and "
        "each toggles the bit before its next entry (vmx_update_cpu_dirty_logging(), deferred while the "
        "vCPU runs a nested guest). kvm_amd and kvm_pvm have no such hardware log (cpu_dirty_log_size 0): "
        "they write-protect instead and never make the request, so the scenario reports it unreachable "
        "after reading /sys/module/kvm_intel/parameters/pml now. On kvm_intel with pml=Y (bochs-intel): "
        "observed; the guest wrote 1536 already-mapped pages after the host turned logging on, KVM took "
        "3 PML-full exits (kvm:kvm_pml_full, one per 512 entries) and no page fault, and KVM_GET_DIRTY_LOG "
        "held all 1536 pages; without logging (control) no PML-full exit.",
        UNREACHABLE,
        UNREACHABLE,
        needs="Intel VMX with PML (kvm_intel pml=Y)",
        intel=OBSERVED,
    ),
)
SCENARIOS: dict[str, Callable[..., ScenarioResult]] = {
    "TLB_FLUSH": tlb_flush,
    "TLB_FLUSH_CURRENT": tlb_flush_current,
    "MMU_FREE_OBSOLETE_ROOTS": mmu_free_obsolete_roots,
    "MMU_SYNC": mmu_sync,
    "LOAD_MMU_PGD": load_mmu_pgd,
    "UPDATE_CPU_DIRTY_LOGGING": update_cpu_dirty_logging,
}
