"""The MMU requests: TLB flushes, obsolete and unsynced roots, loading the root, dirty logging."""

from __future__ import annotations

from collections.abc import Callable

from pykvm import x86

from .common import DATA, EXTRA_SLOT_GPA, OBSERVED, PORT_READY, Outcome, Timeline, is_port, machine, request, run_until

# ---- MMU_FREE_OBSOLETE_ROOTS ----------------------------------------------------

ROOTS_GUEST = f"""
        mov ${EXTRA_SLOT_GPA:#x}, %rbx
        mov (%rbx), %rax                # touch the second slot: KVM maps it
        movq $1, (%rbx)
loop:   out %al, $0x10
        jmp loop
"""


def mmu_free_obsolete_roots(control: bool = False) -> Outcome:
    """Deleting a memslot zaps all MMU pages fast and raises KVM_REQ_MMU_FREE_OBSOLETE_ROOTS: new roots next entry."""
    t = Timeline("MMU_FREE_OBSOLETE_ROOTS", control)
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


def tlb_flush(control: bool = False) -> Outcome:
    """KVM_GET_DIRTY_LOG write-protects the logged pages and raises KVM_REQ_TLB_FLUSH on every vCPU."""
    t = Timeline("TLB_FLUSH", control)
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
    ),
    request(
        "TLB_FLUSH_CURRENT",
        "guest MOV CR3 under shadow paging, nested transitions",
        "kvm_vcpu_flush_tlb_current()",
        "guest MOV CR3 (shadow paging)",
        "stat tlb_flush +1 per MOV CR3",
        "Flushes only the current root's translations: cheaper than a full flush when one address space changed.",
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
    ),
    request(
        "MMU_SYNC",
        "shadow paging: guest page-table writes to unsync pages",
        "kvm_mmu_sync_roots()",
        "shadow paging only",
        "kvm_mmu_sync_page",
        "Resynchronises unsync shadow pages with the guest's tables.",
    ),
    request(
        "LOAD_MMU_PGD",
        "shadow paging / nested CR3 changes",
        "kvm_mmu_load_pgd()",
        "shadow paging only",
        "none visible",
        "Loads the current root into the hardware (CR3/nCR3/EPTP) before entry.",
    ),
    request(
        "UPDATE_CPU_DIRTY_LOGGING",
        "dirty logging toggled with PML",
        "vmx_update_cpu_dirty_logging()",
        "Intel VMX with PML",
        "",
        "Turns page-modification logging on or off.",
        needs="Intel VMX (PML)",
    ),
)
SCENARIOS: dict[str, Callable[..., Outcome]] = {
    "TLB_FLUSH": tlb_flush,
    "MMU_FREE_OBSOLETE_ROOTS": mmu_free_obsolete_roots,
}
