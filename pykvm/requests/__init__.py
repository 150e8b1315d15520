"""KVM's requests (``KVM_REQ_*``): what raises each one, what handles it, and what pykvm measured here.

Why this exists: before every guest entry KVM's ``vcpu_enter_guest()`` checks
a set of per-vCPU request bits that other code raised (an ioctl, a timer, an
MMU notifier, another vCPU). This table names each request, where it is made
and handled (kernel 6.12 sources), how pykvm raises it and what evidence shows
it was handled; :mod:`pykvm.requests.scenarios` runs the scenarios. The
``expected`` column holds what was measured on kvm_pvm and kvm_amd; verdicts
printed by ``python -m pykvm.requests`` are measured in that run, and the tests
compare the two.
"""

from __future__ import annotations

import dataclasses

import pykvm

from ..hosts.vendor import VendorModule, detect_vendor
from .scenarios import NO_EFFECT, NOT_IMPLEMENTED, OBSERVED, SCENARIOS, UNREACHABLE, Outcome

PVM, AMD = VendorModule.PVM, VendorModule.AMD


@dataclasses.dataclass(frozen=True)
class Request:
    """One ``KVM_REQ_*`` of x86 KVM."""

    name: str
    made_in: str
    handled_in: str
    trigger: str
    evidence: str
    explanation: str
    expected: dict[VendorModule, str] = dataclasses.field(default_factory=dict)
    needs: str = ""               # what a host lacks when the request is not reachable there

    @property
    def implemented(self) -> bool:
        return self.name in SCENARIOS


def _r(name: str, made_in: str, handled_in: str, trigger: str, evidence: str, explanation: str,
       pvm: str = NOT_IMPLEMENTED, amd: str = NOT_IMPLEMENTED, needs: str = "") -> Request:
    return Request(name, made_in, handled_in, trigger, evidence, explanation, {PVM: pvm, AMD: amd}, needs)


REQUESTS: tuple[Request, ...] = (
    _r("EVENT", "KVM_INTERRUPT, KVM_SET_REGS, KVM_SET_VCPU_EVENTS, LAPIC delivery", "inject_pending_event()",
       "KVM_INTERRUPT 0x40 to a guest with IF=1", "stats req_event, irq_injections; the guest's handler",
       "KVM_REQ_EVENT means 'something may be deliverable now': at the next entry KVM re-evaluates pending "
       "exceptions, NMIs, SMIs and interrupts and injects the highest-priority one the guest accepts (or "
       "opens an interrupt/NMI window). Without it, a vector queued while the vCPU was outside the guest "
       "would wait for an unrelated exit.", OBSERVED, OBSERVED),
    _r("NMI", "KVM_NMI, LAPIC NMI delivery", "process_nmi()", "KVM_NMI",
       "stat nmi_injections; the guest's vector-2 handler",
       "KVM_REQ_NMI moves NMIs raised from any context into the vCPU's nmi_pending count (at most two: one "
       "in service, one latched), then KVM_REQ_EVENT injects one. Collecting them at entry keeps the count "
       "race-free against the vCPU thread.", OBSERVED, OBSERVED),
    _r("TRIPLE_FAULT", "KVM_SET_VCPU_EVENTS (triple_fault.pending), nested exits, KVM_X86_SET_MCE",
       "vcpu_enter_guest(): KVM_EXIT_SHUTDOWN", "KVM_CAP_X86_TRIPLE_FAULT_EVENT + a pending triple fault",
       "KVM_EXIT_SHUTDOWN with no guest instruction run",
       "KVM_REQ_TRIPLE_FAULT makes the next entry end the run with KVM_EXIT_SHUTDOWN (or a nested VM exit to "
       "L1) instead of entering: a shutdown decided outside the guest, e.g. restored by migration, takes "
       "effect without guest code running.", OBSERVED, OBSERVED),
    _r("MSR_FILTER_CHANGED", "KVM_X86_SET_MSR_FILTER", "kvm_x86_ops.recalc_msr_intercepts",
       "USER_SPACE_MSR + a filter denying RDMSR 0x10 while the guest loops on it",
       "KVM_EXIT_X86_RDMSR, reason filter",
       "MSRs the hardware lets the guest access directly must become intercepted when userspace denies "
       "them: KVM_REQ_MSR_FILTER_CHANGED recomputes each vCPU's MSR intercept bitmap before it enters again, "
       "so the very next RDMSR is filtered.", OBSERVED, OBSERVED),
    _r("CLOCK_UPDATE", "KVM_SET_CLOCK, KVM_KVMCLOCK_CTRL, vCPU migration, TSC writes", "kvm_guest_time_update()",
       "guest enables kvmclock; KVM_SET_CLOCK +10 s; KVM_KVMCLOCK_CTRL",
       "the guest's kvmclock record (version +2, system_time +10 s, GUEST_STOPPED); trace kvm_pvclock_update",
       "The kvmclock page is the guest's clock: (tsc_timestamp, system_time, multiplier). KVM rewrites it, "
       "with the version odd while it does, whenever the mapping from TSC to time changes; "
       "KVM_REQ_CLOCK_UPDATE defers that write to the vCPU's own thread just before entry, where the TSC "
       "read and the guest's view agree.", OBSERVED, OBSERVED),
    _r("GLOBAL_CLOCK_UPDATE", "guest write of MSR_KVM_SYSTEM_TIME_NEW, vCPU load on a new host CPU",
       "kvm_gen_kvmclock_update()", "guest writes MSR 0x4b564d01",
       "kvm_pvclock_update now and ~0.1 s later with no guest action",
       "Raises KVM_REQ_CLOCK_UPDATE on this vCPU now and, through delayed work 100 ms later, on every vCPU of "
       "the VM, so all vCPUs' kvmclock pages agree."),
    _r("MASTERCLOCK_UPDATE", "host clocksource change, IA32_TSC writes, KVM_SET_CLOCK",
       "kvm_update_masterclock()", "guest writes MSR 0x12 then 0x4b564d01; host sets IA32_TSC",
       "trace kvm_update_master_clock; pvclock TSC_STABLE 0->1",
       "Recomputes the VM-wide master clock (one host TSC/ns pair every vCPU's kvmclock derives from) and "
       "then every vCPU's clock: what makes a guest's kvmclock monotonic across vCPUs."),
    _r("STEAL_UPDATE", "vCPU load (kvm_arch_vcpu_load), guest write of MSR_KVM_STEAL_TIME",
       "record_steal_time()", "guest writes MSR 0x4b564d03 = record | enable",
       "the steal-time record's version +2 per KVM_RUN",
       "Tells the guest how long its vCPU was runnable but not running (host run-queue delay): KVM raises "
       "the request each time the vCPU is loaded on a host CPU and writes the record before entering.",
       OBSERVED, OBSERVED),
    _r("MIGRATE_TIMER", "vCPU load on a different host CPU", "__kvm_migrate_timers()",
       "LAPIC one-shot timer armed; sched_setaffinity to the other CPU between runs",
       "trace timer:hrtimer_start function=apic_timer_fn on the new CPU",
       "Moves the vCPU's hrtimers (LAPIC timer, PIT) to the host CPU the vCPU now runs on, so their expiry "
       "interrupts the right CPU."),
    _r("TLB_FLUSH", "KVM_GET_DIRTY_LOG, MMU notifiers, memslot changes (kvm_flush_remote_tlbs)",
       "kvm_vcpu_flush_tlb_all()", "KVM_MEM_LOG_DIRTY_PAGES on slot 0; KVM_GET_DIRTY_LOG",
       "VM stat remote_tlb_flush_requests, vCPU stat tlb_flush",
       "When KVM removes or write-protects guest mappings, stale translations may stay in every CPU's TLB; "
       "KVM_REQ_TLB_FLUSH (with a kick) makes each vCPU flush all its guest TLB entries before it runs again.",
       OBSERVED, OBSERVED),
    _r("TLB_FLUSH_CURRENT", "guest MOV CR3 under shadow paging, nested transitions", "kvm_vcpu_flush_tlb_current()",
       "guest MOV CR3 (shadow paging)", "stat tlb_flush +1 per MOV CR3",
       "Flushes only the current root's translations: cheaper than a full flush when one address space "
       "changed."),
    _r("MMU_FREE_OBSOLETE_ROOTS", "memslot deletion/move (kvm_mmu_zap_all_fast), role changes",
       "kvm_mmu_free_obsolete_roots()", "delete a populated memslot while the vCPU exists",
       "trace kvm_mmu_zap_all_fast, then kvm_mmu_get_page at the next entry",
       "Deleting a memslot must not leave any vCPU translating through pages that mapped it. KVM bumps the "
       "MMU generation (kvm_mmu_zap_all_fast) so every existing root is obsolete, and raises "
       "KVM_REQ_MMU_FREE_OBSOLETE_ROOTS on all vCPUs: each drops its obsolete roots before entering, and the "
       "entry builds a fresh root (kvm_mmu_get_page) that knows only the remaining slots. The zap is lazy "
       "(no walk of the old tables under the lock); the request is what makes it safe.", OBSERVED, OBSERVED),
    _r("MMU_SYNC", "shadow paging: guest page-table writes to unsync pages", "kvm_mmu_sync_roots()",
       "shadow paging only", "kvm_mmu_sync_page", "Resynchronises unsync shadow pages with the guest's tables."),
    _r("LOAD_MMU_PGD", "shadow paging / nested CR3 changes", "kvm_mmu_load_pgd()", "shadow paging only",
       "none visible", "Loads the current root into the hardware (CR3/nCR3/EPTP) before entry."),
    _r("REPORT_TPR_ACCESS", "LAPIC TPR access with KVM_TPR_ACCESS_REPORTING", "KVM_EXIT_TPR_ACCESS",
       "split irqchip, TPR reporting on; guest reads then writes the TPR", "KVM_EXIT_TPR_ACCESS (rip, is_write)",
       "Reports guest accesses to the xAPIC TPR so a VMM can patch them (QEMU's kvmvapic for old Windows)."),
    _r("IOAPIC_EOI_EXIT", "EOI of a level vector routed through a userspace IOAPIC", "KVM_EXIT_IOAPIC_EOI",
       "split irqchip, level MSI route on a GSI < 24, guest EOIs", "KVM_EXIT_IOAPIC_EOI with the vector",
       "With the IOAPIC in userspace, KVM must tell it when a level-triggered interrupt was EOI'd so it can "
       "re-check the line."),
    _r("SCAN_IOAPIC", "KVM_SET_GSI_ROUTING, IOAPIC redirection changes", "vcpu_scan_ioapic()",
       "KVM_SET_GSI_ROUTING", "indirect: the EOI exit appears only after the rescan",
       "Recomputes which vectors need an EOI exit (the EOI exit bitmap) from the routing table."),
    _r("VM_DEAD", "kvm_vm_dead(): an unrecoverable KVM bug or state (e.g. SMI without SMRAM)",
       "KVM_RUN returns EIO", "KVM_SMI with no SMRAM slot", "EIO from KVM_RUN and every later ioctl",
       "Marks the VM dead: every vCPU leaves with EIO and no ioctl works any more.", pvm=UNREACHABLE,
       needs="SMM"),
    _r("SMI", "KVM_SMI, LAPIC SMI delivery", "process_smi()", "RAM in address space 1, then KVM_SMI",
       "events smi.pending; the guest's SMM handler at SMBASE+0x8000", "Enters system-management mode.",
       pvm=UNREACHABLE, needs="SMM"),
    _r("GET_NESTED_STATE_PAGES", "nested VM entry / KVM_SET_NESTED_STATE", "get_nested_state_pages()",
       "nested guest", "", "Maps the L1 pages nested state refers to.",
       needs="nested virtualization"),
    _r("APF_HALT", "async page fault that cannot be delivered", "vcpu blocks", "async PF with userfaultfd",
       "", "Halts the vCPU until a page fault handled asynchronously completes.",
       needs="async page faults (kvm_pvm: not offered)"),
    _r("APF_READY", "async page fault completed", "kvm_check_async_pf_completion()", "async PF with userfaultfd",
       "", "Tells the guest an async page fault is done.",
       needs="async page faults"),
    _r("HV_CRASH", "Hyper-V crash MSRs", "KVM_EXIT_SYSTEM_EVENT crash", "Hyper-V enlightenments", "",
       "Reports a Hyper-V guest crash.",
       needs="Hyper-V emulation"),
    _r("HV_RESET", "Hyper-V reset MSR", "KVM_EXIT_SYSTEM_EVENT reset", "Hyper-V enlightenments", "",
       "Resets a Hyper-V guest.",
       needs="Hyper-V emulation"),
    _r("HV_EXIT", "Hyper-V SynIC / hypercalls", "KVM_EXIT_HYPERV", "Hyper-V enlightenments", "",
       "Exits to userspace for Hyper-V SynIC events.",
       needs="Hyper-V emulation"),
    _r("HV_STIMER", "Hyper-V synthetic timers", "kvm_hv_process_stimers()", "Hyper-V enlightenments", "",
       "Processes expired Hyper-V synthetic timers.",
       needs="Hyper-V emulation"),
    _r("PMU", "vPMU counter overflow / reprogramming", "kvm_pmu_handle_event()", "guest programs a PMU counter",
       "", "Reprograms the perf events backing the vPMU.",
       needs="a vPMU"),
    _r("PMI", "vPMU counter overflow", "kvm_pmu_deliver_pmi()", "counter overflow", "",
       "Delivers the performance-monitoring interrupt.",
       needs="a vPMU"),
    _r("LOAD_EOI_EXITMAP", "SCAN_IOAPIC result with APICv", "vcpu_load_eoi_exitmap()", "APICv", "",
       "Loads the EOI exit bitmap into the hardware.",
       needs="APICv"),
    _r("APICV_UPDATE", "APICv inhibit changes", "kvm_vcpu_update_apicv()", "APICv", "",
       "Turns hardware APIC virtualization on or off.",
       needs="APICv"),
    _r("APIC_PAGE_RELOAD", "APIC-access page moved", "kvm_vcpu_reload_apic_access_page()", "Intel VMX", "",
       "Reloads the APIC-access page address.",
       needs="Intel VMX (APIC-access page)"),
    _r("UPDATE_CPU_DIRTY_LOGGING", "dirty logging toggled with PML", "vmx_update_cpu_dirty_logging()",
       "Intel VMX with PML", "", "Turns page-modification logging on or off.",
       needs="Intel VMX (PML)"),
)
BY_NAME = {request.name: request for request in REQUESTS}


@dataclasses.dataclass
class Row:
    """One request on this host: its verdict (measured when pykvm has a scenario) and why."""

    request: Request
    verdict: str
    why: str
    outcome: Outcome | None = None

    def as_dict(self) -> dict:
        r = self.request
        return {"name": r.name, "made_in": r.made_in, "handled_in": r.handled_in, "trigger": r.trigger,
                "evidence": r.evidence, "verdict": self.verdict, "why": self.why,
                "outcome": self.outcome.as_dict() if self.outcome else None}


def expected(request: Request, vendor: VendorModule | None = None) -> str:
    """What was measured for ``request`` on ``vendor`` before (the table), NOT_IMPLEMENTED when unknown."""
    vendor = detect_vendor() if vendor is None else vendor
    return request.expected.get(vendor, NOT_IMPLEMENTED)


def run_request(request: Request, vendor: VendorModule | None = None) -> Row:
    """Measure ``request`` here: run its scenario, or say why there is none."""
    vendor = detect_vendor() if vendor is None else vendor
    scenario = SCENARIOS.get(request.name)
    if scenario is not None:
        outcome = scenario()
        return Row(request, outcome.verdict, outcome.why, outcome)
    if request.needs == "SMM":
        with pykvm.Kvm() as kvm:
            if not kvm.check_extension(pykvm.Cap.X86_SMM):
                return Row(request, UNREACHABLE, "needs SMM: this host has no KVM_CAP_X86_SMM (checked now)")
    needs = f" (needs {request.needs})" if request.needs else ""
    return Row(request, NOT_IMPLEMENTED, f"pykvm has no scenario for it yet{needs}")


__all__ = ["REQUESTS", "BY_NAME", "Request", "Row", "run_request", "expected",
           "OBSERVED", "NO_EFFECT", "UNREACHABLE", "NOT_IMPLEMENTED"]
