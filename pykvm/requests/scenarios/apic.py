"""The APIC requests: TPR access reports, EOIs for a userspace IOAPIC, IOAPIC scans, APICv.

With a split irqchip the LAPICs are KVM's and the IOAPIC is userspace's, so
KVM must tell userspace about some LAPIC events through exits: an access to
the TPR (REPORT_TPR_ACCESS) and the EOI of a level-triggered vector that came
through a GSI reserved for the userspace IOAPIC (IOAPIC_EOI_EXIT). Which
vectors need that EOI exit is recomputed from the routing table by
SCAN_IOAPIC, and loaded into APIC-virtualization hardware by
LOAD_EOI_EXITMAP. The scenarios here run a guest that touches its xAPIC at
``0xfee00000`` and spins a few thousand iterations after each access, so that
a host that runs guest code in batches (kvm_pvm) reaches an entry, and handles
the request, before the guest's next exit.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pykvm
from pykvm import Cap, x86
from pykvm.core.constants import IOAPIC_NUM_PINS
from pykvm.core.exits import Exit, IoapicEoiExit, IoExit, TprAccessExit
from pykvm.core.interrupts import MsiMessage, MsiRoute
from pykvm.hosts.vendor import detect_vendor
from pykvm.irqchip import lapic
from pykvm.irqchip.lapic import ApicReg
from pykvm.runtime import hostmaps, trace
from pykvm.x86.msr import XAPIC_BASE
from pykvm.x86.paging import PAGE_SIZE

from .common import (
    NO_EFFECT,
    NOT_IMPLEMENTED,
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

SPIN = 5000             # loop iterations after each APIC access: longer than kvm_pvm's batch of guest code
VECTOR = 0x45           # the vector the EOI scenarios deliver
GSI = 5                 # below the IOAPIC_NUM_PINS GSIs pykvm's split irqchip reserves for the userspace IOAPIC


def _unreachable_without_split(t: ScenarioRecorder) -> ScenarioResult | None:
    """``t.unreachable(...)`` naming the capability a split-irqchip scenario lacks here (checked now), else None."""
    with pykvm.Kvm() as kvm:
        for cap in (Cap.SPLIT_IRQCHIP, Cap.IRQ_ROUTING, Cap.SIGNAL_MSI):
            if not kvm.check_extension(cap):
                return t.unreachable(f"needs a split irqchip with MSI routes: this host has no KVM_CAP_{cap.name} "
                                     "(checked now)")
    return None


# ---- REPORT_TPR_ACCESS -----------------------------------------------------------

TPR_GUEST = f"""
        mov ${XAPIC_BASE:#x}, %ebx
        out %al, ${PORT_READY:#x}
tpr_read:
        mov {ApicReg.TPR:#x}(%rbx), %eax      # read the TPR
after_read:
        mov ${SPIN}, %ecx
1:      loop 1b
tpr_write:
        movl $0x20, {ApicReg.TPR:#x}(%rbx)    # write the TPR
after_write:
        mov ${SPIN}, %ecx
2:      loop 2b
        out %al, ${PORT_HANDLER:#x}
        hlt
"""


def _is_tpr_or_handler(exit: Exit) -> bool:
    return isinstance(exit, TprAccessExit) or is_port(PORT_HANDLER)(exit)


def _lateness(vcpu: pykvm.Vcpu, after: int | None) -> dict[str, Any]:
    """Where the guest was when an exit came: just after the access that raised it, or into its spin."""
    regs = vcpu.regs
    prompt = regs.rip == after
    return {"rip_at_exit": regs.rip, "prompt": prompt, "spins_before_exit": 0 if prompt else SPIN - regs.rcx}


def _describe_lateness(report: dict[str, Any]) -> str:
    if report["prompt"]:
        return "at once (the guest stopped right after the access)"
    return f"late: the guest had run {report['spins_before_exit']} of its {SPIN} spin iterations"


def report_tpr_access(control: bool = False) -> ScenarioResult:
    """KVM_TPR_ACCESS_REPORTING makes each guest TPR access raise KVM_REQ_REPORT_TPR_ACCESS: a TPR exit."""
    t = ScenarioRecorder("REPORT_TPR_ACCESS", control)
    if (missing := _unreachable_without_split(t)) is not None:
        return missing
    with machine("split") as (vm, vcpu):
        code = x86.load_code(vcpu, TPR_GUEST)
        run_until(vcpu, t, is_port(PORT_READY))
        if not control:
            t.host("KVM_TPR_ACCESS_REPORTING enabled=1 (each TPR access raises KVM_REQ_REPORT_TPR_ACCESS)")
            vcpu.tpr_access_reporting(True)
        else:
            t.host("nothing (control): TPR access reporting stays off")
        labels = {code.symbols["tpr_read"]: "tpr_read", code.symbols["tpr_write"]: "tpr_write"}
        after = {"tpr_read": code.symbols["after_read"], "tpr_write": code.symbols["after_write"]}
        reports = []
        with t.trace("kvm:kvm_apic"):
            exit = run_until(vcpu, t, _is_tpr_or_handler)
            while isinstance(exit, TprAccessExit):
                label = labels.get(exit.rip, "?")
                report = {"rip": exit.rip, "label": label, "is_write": exit.is_write,
                          **_lateness(vcpu, after.get(label))}
                reports.append(report)
                t.guest(f"TPR exit: rip {exit.rip:#x} ({label if label != '?' else 'not a TPR access'}), "
                        f"{'write' if exit.is_write else 'read'}, {_describe_lateness(report)}")
                exit = run_until(vcpu, t, _is_tpr_or_handler)
        tpr = lapic.read(vcpu).tpr
        t.guest(f"the guest finished; KVM_GET_LAPIC TPR = {tpr:#x}")
        t.outcome.evidence.update(reports=reports, tpr=tpr)
        wanted = [("tpr_read", False), ("tpr_write", True)]
        seen = [(r["label"], r["is_write"]) for r in reports] == wanted
        late = [r for r in reports if not r["prompt"]]
        return t.verdict(seen, "two KVM_EXIT_TPR_ACCESS: the read at tpr_read, then the write at tpr_write "
                               "(rip and is_write as KVM recorded them when the request was made)"
                               + (f"; {len(late)} came late, during the guest's spin (guest code runs in batches: "
                                  "without the spin the next exit would come first and overwrite the payload)"
                                  if late else ""))


# ---- the EOI scenarios: IOAPIC_EOI_EXIT, SCAN_IOAPIC, LOAD_EOI_EXITMAP --------------------------

EOI_GUEST = f"""
        mov ${XAPIC_BASE:#x}, %ebx
        movl $0x1ff, {ApicReg.SVR:#x}(%rbx)   # APIC software-enabled, spurious vector 0xff
        mov ${SPIN}, %ecx                     # an entry before READY: the scan this raises is done by then
0:      loop 0b
        sti
        out %al, ${PORT_READY:#x}
idle:   pause
        jmp idle
handler:
        movl $0, {ApicReg.EOI:#x}(%rbx)       # EOI
after_eoi:
        mov ${SPIN}, %ecx
1:      loop 1b
        out %al, ${PORT_HANDLER:#x}
        iretq
"""


def level_message(level: bool = True) -> MsiMessage:
    """The MSI of the EOI scenarios: VECTOR to APIC 0, level- or edge-triggered."""
    return MsiMessage.compose(destination=0, vector=VECTOR, trigger_level=level)


def _is_eoi_or_handler(exit: Exit) -> bool:
    return isinstance(exit, IoapicEoiExit) or is_port(PORT_HANDLER)(exit)


def run_eoi_guest(t: ScenarioRecorder, vm: pykvm.Vm, vcpu: pykvm.Vcpu,
                  host_action: Callable[[], None]) -> dict[str, Any]:
    """Run EOI_GUEST to its idle loop, do ``host_action`` (routes, the interrupt), run it until its handler is done.

    Returns the evidence: the EOI exits' vectors, where the guest was at the
    first (how late it came), the LAPIC's TMR before the run (level or
    edge), and the trace counts of the guest's EOIs and of routes KVM read
    while the vCPU ran (kvm_msi_set_irq: the IOAPIC scan reads each reserved
    MSI route).
    """
    code = x86.load_code(vcpu, EOI_GUEST, handlers={VECTOR: "handler"})
    run_until(vcpu, t, is_port(PORT_READY))
    host_action()
    state = lapic.read(vcpu)
    t.guest(f"KVM_GET_LAPIC before the run: IRR {sorted(map(hex, state.irr))}, TMR {sorted(map(hex, state.tmr))}")
    eoi_vectors: list[int] = []
    lateness: dict[str, Any] = {}
    with t.trace("kvm:kvm_eoi", "kvm:kvm_msi_set_irq") as recording:
        exit = run_until(vcpu, t, _is_eoi_or_handler)
        while isinstance(exit, IoapicEoiExit):
            eoi_vectors.append(exit.vector)
            lateness = lateness or _lateness(vcpu, code.symbols["after_eoi"])
            exit = run_until(vcpu, t, _is_eoi_or_handler)
    handler_ran = isinstance(exit, IoExit)
    if eoi_vectors:
        t.guest(f"KVM_EXIT_IOAPIC_EOI vector(s) {[hex(v) for v in eoi_vectors]}, {_describe_lateness(lateness)}; "
                "then the handler finished")
    else:
        t.guest("no KVM_EXIT_IOAPIC_EOI; the handler finished" if handler_ran else "the handler did not finish")
    guest_eois = sum(1 for e in recording.named("kvm:kvm_eoi") if e["vector"] == VECTOR) if recording else None
    route_reads = recording.count("kvm:kvm_msi_set_irq") if recording else None
    return {"eoi_vectors": eoi_vectors, **lateness, "handler_ran": handler_ran,
            "level_in_tmr": VECTOR in state.tmr, "pending_in_irr": VECTOR in state.irr,
            "guest_eoi_events": guest_eois, "route_reads_while_running": route_reads}


def ioapic_eoi_exit(control: bool = False) -> ScenarioResult:
    """The guest EOIs a level vector of a reserved GSI: KVM_REQ_IOAPIC_EOI_EXIT, a KVM_EXIT_IOAPIC_EOI."""
    t = ScenarioRecorder("IOAPIC_EOI_EXIT", control)
    if (missing := _unreachable_without_split(t)) is not None:
        return missing
    with machine("split") as (vm, vcpu):
        kind = "edge" if control else "level"
        t.host(f"KVM_SET_GSI_ROUTING: GSI {GSI} -> {kind}-triggered MSI, vector {VECTOR:#x}, APIC 0"
               + (" (control: an edge vector's EOI needs no IOAPIC)" if control else ""))
        vm.set_gsi_routing((MsiRoute(GSI, level_message(level=not control)),))

        def raise_line() -> None:
            t.host(f"KVM_IRQ_LINE GSI {GSI} = 1; the guest's handler writes its LAPIC EOI register"
                   + ("" if control else " (KVM raises KVM_REQ_IOAPIC_EOI_EXIT)"))
            vm.irq_line(GSI, 1)

        evidence = run_eoi_guest(t, vm, vcpu, raise_line)
        vm.irq_line(GSI, 0)
        t.outcome.evidence.update(evidence)
        seen = evidence["eoi_vectors"] == [VECTOR] and evidence["handler_ran"]
        late = seen and not evidence["prompt"]
        return t.verdict(seen, f"one KVM_EXIT_IOAPIC_EOI with vector {VECTOR:#x} after the guest's EOI"
                               + (", some guest instructions later (guest code runs in batches)" if late else ""))


def _scan_trigger(t: ScenarioRecorder, vm: pykvm.Vm, control: bool) -> Callable[[], None]:
    """The host action of the scan scenarios: the same level MSI in both runs, a route installed only as trigger."""
    def action() -> None:
        if control:
            t.host("nothing (control): no routing change; the routing table stays empty")
        else:
            t.host(f"KVM_SET_GSI_ROUTING: GSI {GSI} -> level MSI, vector {VECTOR:#x} "
                   "(KVM raises KVM_REQ_SCAN_IOAPIC on every vCPU)")
            vm.set_gsi_routing((MsiRoute(GSI, level_message()),))
        t.host(f"KVM_SIGNAL_MSI: level-triggered vector {VECTOR:#x} to APIC 0 (both runs); the guest EOIs it")
        vm.signal_msi(level_message())
    return action


def scan_ioapic(control: bool = False) -> ScenarioResult:
    """KVM_SET_GSI_ROUTING raises KVM_REQ_SCAN_IOAPIC: the rescan puts the route's vector in the EOI-exit set."""
    t = ScenarioRecorder("SCAN_IOAPIC", control)
    if (missing := _unreachable_without_split(t)) is not None:
        return missing
    with machine("split") as (vm, vcpu):
        evidence = run_eoi_guest(t, vm, vcpu, _scan_trigger(t, vm, control))
        t.outcome.evidence.update(evidence)
        reads = evidence["route_reads_while_running"]
        if reads is not None:
            t.guest(f"{reads} kvm_msi_set_irq event(s) during KVM_RUN, when no MSI was sent: the scan reading "
                    "the reserved routes")
        seen = evidence["eoi_vectors"] == [VECTOR] and evidence["handler_ran"]
        return t.verdict(seen, f"the same level MSI's EOI became KVM_EXIT_IOAPIC_EOI only after the routing "
                               f"update: vcpu_scan_ioapic() put vector {VECTOR:#x} in the vCPU's EOI-exit set"
                               + (f"; the trace shows the scan reading the route ({reads} read)" if reads else ""))


def apicv_parameters(sys_module: Path | str = SYS_MODULE) -> dict[str, str]:
    """The loaded vendor module's APIC-virtualization switches, read now: e.g. ``{"kvm_amd avic": "N"}``.

    kvm_amd's ``avic`` and kvm_intel's ``enable_apicv`` are cleared at load
    time when the CPU lacks the feature, so they say what is in use. Empty when
    the module has none (kvm_pvm).
    """
    found = {}
    for module, parameter in (("kvm_intel", "enable_apicv"), ("kvm_intel", "flexpriority"), ("kvm_amd", "avic")):
        value = module_parameter(module, parameter, sys_module)
        if value is not None:
            found[f"{module} {parameter}"] = value
    return found


def _switches(parameters: dict[str, str]) -> str:
    return ", ".join(f"{name}={value}" for name, value in parameters.items()) or \
        f"{detect_vendor().value} has no APICv/AVIC parameter"


def _apicv_on(parameters: dict[str, str]) -> bool:
    return any(is_on(value) for name, value in parameters.items() if not name.endswith("flexpriority"))


def load_eoi_exitmap(control: bool = False) -> ScenarioResult:
    """Every IOAPIC scan raises KVM_REQ_LOAD_EOI_EXITMAP; its bitmap only matters with APICv / AVIC on."""
    t = ScenarioRecorder("LOAD_EOI_EXITMAP", control)
    if (missing := _unreachable_without_split(t)) is not None:
        return missing
    parameters = apicv_parameters()
    t.add("note", f"APIC virtualization here: {_switches(parameters)} (read now)")
    with machine("split") as (vm, vcpu):
        evidence = run_eoi_guest(t, vm, vcpu, _scan_trigger(t, vm, control))
        scanned = evidence["eoi_vectors"] == [VECTOR]
        evidence.update(apicv=_apicv_on(parameters), scanned=scanned)
        t.outcome.evidence.update(evidence)
        if not control and not evidence["apicv"]:
            if scanned:
                why = ("raised: the rescan ran (its EOI exit came) and vcpu_scan_ioapic() always follows it with "
                       "KVM_REQ_LOAD_EOI_EXITMAP; no visible effect, APIC virtualization is off "
                       f"({_switches(parameters)}): every EOI already traps to KVM, the bitmap it loads is unused")
            else:
                why = "the rescan that raises it did not show (no EOI exit), and with APICv off nothing else would"
            t.outcome.verdict, t.outcome.why = NO_EFFECT, why
            return t.outcome
        # With APICv on (or in the control), an EOI exit shows the loaded bitmap made the hardware trap the EOI.
        return t.verdict(scanned and evidence["apicv"], "with APICv on, the EOI trapped because the loaded "
                                                        "EOI-exit bitmap had the vector")


def _no_trigger_yet(t: ScenarioRecorder, why: str) -> ScenarioResult:
    """The host could raise the request but pykvm has no trigger: not implemented; its control ran nothing either."""
    if t.outcome.control:
        return t.verdict(False, "", "nothing run: pykvm has no trigger for it on this host")
    t.outcome.verdict, t.outcome.why = NOT_IMPLEMENTED, why
    return t.outcome


def apicv_update(control: bool = False) -> ScenarioResult:
    """KVM_REQ_APICV_UPDATE follows a change of APICv inhibits; with APICv off, none ever changes."""
    t = ScenarioRecorder("APICV_UPDATE", control)
    parameters = apicv_parameters()
    if not _apicv_on(parameters):
        return t.unreachable(f"needs APICv or AVIC: {_switches(parameters)} (read now); with it off KVM never "
                             "toggles APIC virtualization, so nothing raises the request")
    return _no_trigger_yet(t, f"APIC virtualization is on ({_switches(parameters)}) but pykvm has no scenario "
                              "that flips an inhibit yet")


# ---- APIC_PAGE_RELOAD -----------------------------------------------------------

RELOAD_GUEST = f"""
        out %al, ${PORT_READY:#x}
        mov ${SPIN}, %ecx                     # the guest never touches its APIC page (0xfee00000)
1:      loop 1b
        mov $0x600d, %eax
        out %al, ${PORT_HANDLER:#x}
        hlt
"""
GUEST_DONE = 0x600D     # what RELOAD_GUEST leaves in RAX when it reached PORT_HANDLER


def _flexpriority(parameters: dict[str, str]) -> bool:
    return is_on(parameters.get("kvm_intel flexpriority"))


def apic_access_mapping(before: list[hostmaps.Mapping], after: list[hostmaps.Mapping]) -> \
        tuple[hostmaps.Mapping | None, list[hostmaps.Mapping]]:
    """KVM's APIC-access page among the mappings vCPU creation added: the one new 4 KiB shared anonymous one.

    Returns it (None unless exactly one matches) and every new mapping, to say why when none or several do.
    """
    new = hostmaps.new_mappings(before, after)
    pages = [m for m in new if m.shared_anonymous and m.size == PAGE_SIZE]
    return (pages[0] if len(pages) == 1 else None), new


def _covering(recording: trace.Recording, address: int) -> int:
    """How many kvm_unmap_hva_range events of ``recording`` covered ``address``."""
    return sum(1 for e in recording.named("kvm:kvm_unmap_hva_range") if e["start"] <= address < e["end"])


def apic_page_reload(control: bool = False) -> ScenarioResult:
    """madvise(MADV_DONTNEED) on KVM's APIC-access page: KVM_REQ_APIC_PAGE_RELOAD looks it up again at entry.

    kvm_intel with flexpriority only: its vCPU creation maps the page into this
    process (``vm_mmap``), found as the new 4 KiB ``/dev/zero (deleted)``
    mapping. Evidence: the page leaves this process's page table (smaps Rss
    4 -> 0 kB) and comes back during the next KVM_RUN though the guest never
    touches it (vmx_set_apic_access_page_addr() faults it in to get its
    address), and a kvm_unmap_hva_range event covers it.
    """
    t = ScenarioRecorder("APIC_PAGE_RELOAD", control)
    parameters = apicv_parameters()
    if not any(is_on(value) for value in parameters.values()):
        return t.unreachable(f"needs KVM's APIC-access page, allocated only with kvm_intel flexpriority/enable_apicv "
                             f"or kvm_amd avic: {_switches(parameters)} (read now), so there is no page to move")
    if not _flexpriority(parameters):
        return t.unreachable(f"needs kvm_intel's flexpriority: {_switches(parameters)} (read now); only VMX with it "
                             "implements set_apic_access_page_addr, and kvm_unmap_gfn_range() raises the request "
                             "only then (kvm_amd's AVIC page is invalidated without it)")
    if (missing := _unreachable_without_split(t)) is not None:
        return missing
    with pykvm.Kvm() as kvm, kvm.create_vm(irqchip="split") as vm:
        before = hostmaps.read_maps()
        vcpu = vm.create_vcpu()
        page, new = apic_access_mapping(before, hostmaps.read_maps())
        t.host("KVM_CREATE_VCPU (split irqchip: a LAPIC in KVM); new mappings of this process: "
               + ("; ".join(m.describe() for m in new) or "none"))
        if page is None:
            return _no_trigger_yet(t, f"kvm_intel has flexpriority here ({_switches(parameters)}) but vCPU creation "
                                      f"added {len(new)} mapping(s) and not exactly one 4 KiB shared anonymous one "
                                      "(/dev/zero (deleted)), so pykvm cannot tell which is KVM's APIC-access page")
        rss = {"created": hostmaps.resident_kb(page)}
        t.host(f"KVM's APIC-access page (private memslot, GPA {XAPIC_BASE:#x}) is mapped at {page.start:#x}; "
               f"Rss {rss['created']} kB")
        x86.load_code(vcpu, RELOAD_GUEST)
        run_until(vcpu, t, is_port(PORT_READY))
        rss["ready"] = hostmaps.resident_kb(page)
        t.guest(f"the guest reached READY (first entry done); the page's Rss: {rss['ready']} kB")
        with t.trace("kvm:kvm_unmap_hva_range") as recording:
            if control:
                t.host("nothing (control): the page stays mapped")
            else:
                hostmaps.madvise_dontneed(page)
                t.host(f"madvise({page.start:#x}, {page.size}, MADV_DONTNEED): the MMU notifier runs "
                       "kvm_unmap_gfn_range() on the private memslot (KVM raises KVM_REQ_APIC_PAGE_RELOAD)")
            rss["before_run"] = hostmaps.resident_kb(page)
            t.host(f"the page's Rss before KVM_RUN: {rss['before_run']} kB")
            exit = run_until(vcpu, t, is_port(PORT_HANDLER))
        rss["after_run"] = hostmaps.resident_kb(page)
        guest_ok = isinstance(exit, IoExit) and vcpu.regs.rax == GUEST_DONE
        t.guest(f"the guest ran to its end without touching 0xfee00000 (RAX {vcpu.regs.rax:#x}); the page's Rss "
                f"after KVM_RUN: {rss['after_run']} kB")
        covering = _covering(recording, page.start) if recording is not None else None
        if covering is not None:
            t.add("note", f"{covering} kvm_unmap_hva_range event(s) covered the page")
        t.outcome.evidence.update(mapping=page.describe(), rss_kb=rss, unmap_events=covering, guest_ok=guest_ok)
        dropped = rss["before_run"] == 0 < rss["after_run"] == page.size // 1024
        seen = dropped and guest_ok and covering in (None, 1)
        return t.verdict(seen, f"the page left this process's page table (Rss {rss['ready']} -> "
                               f"{rss['before_run']} kB) and was back after KVM_RUN ({rss['after_run']} kB) although "
                               "the guest never touched it: vmx_set_apic_access_page_addr(), run for the request, "
                               "faulted it in to write its address into the VMCS"
                               + ("; one kvm_unmap_hva_range event covered it" if covering else
                                  f" (no trace: {t.trace_problem})" if covering is None else ""))


REQUESTS = (
    request(
        "REPORT_TPR_ACCESS",
        "__report_tpr_access() (lapic.c), on a guest TPR read or write with KVM_TPR_ACCESS_REPORTING on",
        "vcpu_enter_guest(): exit KVM_EXIT_TPR_ACCESS",
        "split irqchip, KVM_TPR_ACCESS_REPORTING on; guest reads then writes the xAPIC TPR (0xfee00080)",
        "KVM_EXIT_TPR_ACCESS: rip and is_write of each access; trace kvm_apic",
        "When the LAPIC emulation reads or writes the task-priority register and userspace asked for reports "
        "(KVM_TPR_ACCESS_REPORTING), __report_tpr_access() stores the guest RIP and the direction in kvm_run "
        "and raises KVM_REQ_REPORT_TPR_ACCESS; vcpu_enter_guest() turns it into KVM_EXIT_TPR_ACCESS before the "
        "next entry. A VMM uses it to find and patch the guest's TPR instructions (QEMU's kvmvapic, for old "
        "32-bit Windows that touches the TPR on every interrupt). The payload is written when the request is "
        "made, so an exit in between would overwrite it: the guest spins after each access so that a host "
        "running guest code in batches enters again first.",
        OBSERVED,
        OBSERVED,
        intel=OBSERVED,
    ),
    request(
        "IOAPIC_EOI_EXIT",
        "kvm_ioapic_send_eoi() (lapic.c), on the EOI of a vector in the vCPU's EOI-exit set, split irqchip",
        "vcpu_enter_guest(): exit KVM_EXIT_IOAPIC_EOI",
        f"split irqchip, level MSI route on GSI {GSI} (< {IOAPIC_NUM_PINS}: the IOAPIC's), KVM_IRQ_LINE, guest EOIs",
        "KVM_EXIT_IOAPIC_EOI with the vector; none for an edge route (control); TMR, trace kvm_eoi",
        "With the IOAPIC in userspace, a level-triggered interrupt stays asserted in the IOAPIC (remote IRR) "
        "until the guest EOIs it, and only the kernel's LAPIC sees that EOI. apic_set_eoi() calls "
        "kvm_ioapic_send_eoi(), which, for a vector the last IOAPIC scan marked, records it and raises "
        "KVM_REQ_IOAPIC_EOI_EXIT; vcpu_enter_guest() exits with KVM_EXIT_IOAPIC_EOI so the VMM's IOAPIC can "
        "clear remote IRR and re-deliver the line if it is still high. Edge vectors are never marked.",
        OBSERVED,
        OBSERVED,
        intel=OBSERVED,
    ),
    request(
        "SCAN_IOAPIC",
        "kvm_make_scan_ioapic_request(): KVM_SET_GSI_ROUTING (split), IOAPIC redirection writes, APIC map changes",
        "vcpu_scan_ioapic()",
        f"KVM_SET_GSI_ROUTING installs a level MSI route on GSI {GSI}; the same level MSI is sent in both runs",
        "the EOI becomes KVM_EXIT_IOAPIC_EOI only after the rescan; trace kvm_msi_set_irq during KVM_RUN",
        "Which EOIs must leave the kernel depends on the routing: after a routing change (with a split "
        "irqchip, kvm_arch_post_irq_routing_update()) or a change of the IOAPIC or of the APIC IDs, KVM raises "
        "KVM_REQ_SCAN_IOAPIC on every vCPU. Before its next entry each vCPU runs vcpu_scan_ioapic(), which "
        "walks the GSIs reserved for the IOAPIC (kvm_scan_ioapic_routes() decodes each MSI route) and marks "
        "the level-triggered vectors aimed at it. The control sends the same level MSI without a route: the "
        "vector is not marked and its EOI stays in the kernel.",
        OBSERVED,
        OBSERVED,
        intel=OBSERVED,
    ),
    request(
        "LOAD_EOI_EXITMAP",
        "vcpu_scan_ioapic(), after every IOAPIC scan outside guest mode",
        "vcpu_load_eoi_exitmap() -> the vendor's load_eoi_exitmap",
        "the SCAN_IOAPIC trigger (a level MSI route installed), APIC virtualization state read from /sys/module",
        "with APICv on: the EOI traps because of the bitmap; off: none possible (the EOI traps anyway)",
        "With APIC virtualization the CPU completes EOIs itself, except for vectors in an EOI-exit bitmap: "
        "after each scan, KVM_REQ_LOAD_EOI_EXITMAP hands the scanned vector set (plus Hyper-V SynIC vectors) "
        "to the vendor code, which writes it into the VMCS on Intel APICv. Without APICv or AVIC every EOI "
        "is an APIC write KVM emulates, so the request is raised and handled with nothing to change.",
        NO_EFFECT,
        NO_EFFECT,
        needs="APICv",
        intel=NO_EFFECT,
    ),
    request(
        "APICV_UPDATE",
        "__kvm_set_or_clear_apicv_inhibit() when the inhibit set turns empty or non-empty; vCPU creation",
        "kvm_vcpu_update_apicv()",
        "APICv or AVIC on (module parameter, read now); then an inhibit such as KVM_GUESTDBG_BLOCKIRQ",
        "none here: APIC virtualization is off",
        "APIC virtualization is switched off per VM while something it cannot handle is in use (inhibits: "
        "the PIT in reinject mode, Hyper-V auto-EOI, a guest-debug IRQ block, x2APIC ID changes...). When the "
        "set of inhibits becomes empty or non-empty, KVM raises KVM_REQ_APICV_UPDATE on all vCPUs, and each "
        "turns the hardware feature on or off before entering. With the module's APICv/AVIC disabled the "
        "'disabled' inhibit is permanent, so the set never changes and the request is never made.",
        UNREACHABLE,
        UNREACHABLE,
        needs="APICv",
        intel=UNREACHABLE,
    ),
    request(
        "APIC_PAGE_RELOAD",
        "kvm_unmap_gfn_range() (mmu/mmu.c): an MMU-notifier invalidation covers KVM's private APIC-access memslot "
        "and the vendor module has set_apic_access_page_addr (kvm_intel with flexpriority); also "
        "vmx_set_virtual_apic_mode() when the LAPIC enters xAPIC mode (vCPU reset)",
        "kvm_vcpu_reload_apic_access_page() -> vmx_set_apic_access_page_addr()",
        "split irqchip on kvm_intel flexpriority=Y (read now); the new 4 KiB /dev/zero (deleted) mapping that "
        "KVM_CREATE_VCPU added to this process is KVM's APIC-access page; madvise(MADV_DONTNEED) on it, then KVM_RUN",
        "the page's smaps Rss 4 -> 0 kB after the madvise, 4 kB again after KVM_RUN (the guest never touches "
        "0xfee00000); one kvm:kvm_unmap_hva_range event covering it; the guest still runs to its end",
        "Intel's 'virtualize APIC accesses' (flexpriority, and APICv) makes the CPU turn guest accesses to the "
        "APIC page into APIC-access exits or virtualized accesses, recognising the page by its host physical "
        "address, which the VMCS holds. KVM backs GPA 0xfee00000 with a page of a private memslot "
        "(APIC_ACCESS_PAGE_PRIVATE_MEMSLOT) that __x86_set_memory_region() maps with vm_mmap(MAP_SHARED | "
        "MAP_ANONYMOUS) into the process creating the first vCPU, so it shows in /proc/self/maps as a 4 KiB "
        "'/dev/zero (deleted)' mapping; the page is not pinned. When the host MM unmaps or migrates it, the MMU "
        "notifier reaches kvm_unmap_gfn_range(), which raises KVM_REQ_APIC_PAGE_RELOAD on all vCPUs, and before "
        "its next entry each runs vmx_set_apic_access_page_addr(): it looks the page up again through the "
        "memslot (gfn_to_pfn_memslot(), faulting it back into the VMM's page table) and writes its address into "
        "the VMCS. The scenario's madvise(MADV_DONTNEED) only drops the page-table entry (a shared mapping keeps "
        "the page), so the address written back is the same; the fault-in is what shows. Only VMX implements the "
        "reload: kvm_amd's AVIC page is invalidated without the request (SVM has no set_apic_access_page_addr), "
        "and without flexpriority, APICv or AVIC there is no page at all (kvm_pvm). On kvm_intel with "
        "flexpriority=Y (bochs-intel): observed; KVM_CREATE_VCPU added two mappings, the 12 KiB kvm_run and the "
        "4 KiB page (Rss 4 kB already: 6.12's kvm_alloc_apic_access_page() looks it up once); after the madvise "
        "its Rss was 0 kB, one kvm_unmap_hva_range event covered exactly the page, and after the next KVM_RUN "
        "the Rss was 4 kB again while the guest ran to its end without touching 0xfee00000; without the madvise "
        "(control) 4 kB throughout and no event covering the page.",
        UNREACHABLE,
        UNREACHABLE,
        needs="kvm_intel with flexpriority (the APIC-access page and its VMCS address)",
        intel=OBSERVED,
    ),
)
SCENARIOS: dict[str, Callable[..., ScenarioResult]] = {
    "REPORT_TPR_ACCESS": report_tpr_access,
    "IOAPIC_EOI_EXIT": ioapic_eoi_exit,
    "SCAN_IOAPIC": scan_ioapic,
    "LOAD_EOI_EXITMAP": load_eoi_exitmap,
    "APICV_UPDATE": apicv_update,
    "APIC_PAGE_RELOAD": apic_page_reload,
}
