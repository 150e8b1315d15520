"""The APIC request scenarios: what each trigger produced and its control did not, figure by figure.

REPORT_TPR_ACCESS, IOAPIC_EOI_EXIT and SCAN_IOAPIC are judged on the exits
KVM returned (payloads, order), the LAPIC state from KVM_GET_LAPIC and, where
tracefs is usable, the kernel's trace events; LOAD_EOI_EXITMAP and
APICV_UPDATE on the APIC-virtualization switches read from /sys/module at the
same time; APIC_PAGE_RELOAD on the Rss of KVM's APIC-access page in this
process's smaps (kvm_intel with flexpriority) or on those switches elsewhere.
"""

from __future__ import annotations

import pytest

from pykvm import Cap, x86
from pykvm.core.exits import IoExit, TprAccessExit
from pykvm.irqchip.lapic import ApicReg
from pykvm.requests import NO_EFFECT, NOT_IMPLEMENTED, OBSERVED, UNREACHABLE
from pykvm.requests.scenarios import apic
from pykvm.requests.scenarios.common import PORT_HANDLER, PORT_READY, is_port, machine
from pykvm.x86.msr import XAPIC_BASE

pytestmark = pytest.mark.requires_cap(Cap.SPLIT_IRQCHIP, Cap.IRQ_ROUTING, Cap.SIGNAL_MSI)


def _in_time(report: dict) -> bool:
    """The exit came at once, or while the guest was still in the spin that follows the access."""
    return report["prompt"] or 0 < report["spins_before_exit"] < apic.SPIN


def test_each_tpr_access_exits_with_its_rip_and_direction(kvm):
    outcome = apic.report_tpr_access()
    assert outcome.verdict == OBSERVED, outcome.steps
    reports = outcome.evidence["reports"]
    assert [(r["label"], r["is_write"]) for r in reports] == [("tpr_read", False), ("tpr_write", True)]
    assert reports[0]["rip"] < reports[1]["rip"]
    assert all(_in_time(r) for r in reports), reports
    assert outcome.evidence["tpr"] == 0x20                    # the write reached the LAPIC

    control = apic.report_tpr_access(control=True)
    assert control.verdict == "absent" and control.evidence["reports"] == []
    assert control.evidence["tpr"] == 0x20                    # the same accesses happened, unreported


def test_the_eoi_of_a_level_vector_exits_and_an_edge_one_does_not(kvm):
    outcome = apic.ioapic_eoi_exit()
    assert outcome.verdict == OBSERVED, outcome.steps
    evidence = outcome.evidence
    assert evidence["eoi_vectors"] == [apic.VECTOR] and evidence["handler_ran"]
    assert evidence["level_in_tmr"] and evidence["pending_in_irr"]
    assert evidence["prompt"] or 0 < evidence["spins_before_exit"] < apic.SPIN

    control = apic.ioapic_eoi_exit(control=True)
    assert control.verdict == "absent"
    assert control.evidence["eoi_vectors"] == [] and control.evidence["handler_ran"]
    assert control.evidence["pending_in_irr"] and not control.evidence["level_in_tmr"]
    for run in (evidence, control.evidence):                  # the guest EOI'd the vector once in both runs
        assert run["guest_eoi_events"] in (None, 1)


def test_a_routing_update_rescans_and_marks_the_level_vector(kvm):
    outcome = apic.scan_ioapic()
    assert outcome.verdict == OBSERVED, outcome.steps
    evidence = outcome.evidence
    assert evidence["eoi_vectors"] == [apic.VECTOR] and evidence["level_in_tmr"]
    assert evidence["route_reads_while_running"] in (None, 1)    # the rescan decoding the one reserved route

    control = apic.scan_ioapic(control=True)
    assert control.verdict == "absent"
    assert control.evidence["eoi_vectors"] == [] and control.evidence["handler_ran"]
    assert control.evidence["level_in_tmr"]                   # the same level MSI arrived, unmarked
    assert control.evidence["route_reads_while_running"] in (None, 0)


def test_load_eoi_exitmap_follows_each_scan_and_matters_only_with_apicv(kvm):
    outcome = apic.load_eoi_exitmap()
    control = apic.load_eoi_exitmap(control=True)
    assert outcome.evidence["scanned"] and not control.evidence["scanned"]
    assert control.verdict == "absent"
    if outcome.evidence["apicv"]:
        assert outcome.verdict == OBSERVED
    else:
        assert outcome.verdict == NO_EFFECT and "APIC virtualization is off" in outcome.why


def test_apicv_switches_are_read_from_sys_module(tmp_path):
    (tmp_path / "kvm_amd" / "parameters").mkdir(parents=True)
    (tmp_path / "kvm_amd" / "parameters" / "avic").write_text("N\n")
    assert apic.apicv_parameters(str(tmp_path)) == {"kvm_amd avic": "N"}
    (tmp_path / "kvm_intel" / "parameters").mkdir(parents=True)
    (tmp_path / "kvm_intel" / "parameters" / "enable_apicv").write_text("Y\n")
    assert apic.apicv_parameters(str(tmp_path))["kvm_intel enable_apicv"] == "Y"
    assert apic.apicv_parameters(str(tmp_path / "none")) == {}


def test_with_apicv_on_the_requests_pykvm_cannot_trigger_say_so(monkeypatch):
    monkeypatch.setattr(apic, "apicv_parameters", lambda sys_module=apic.SYS_MODULE: {"kvm_amd avic": "Y"})
    outcome = apic.apicv_update()
    assert outcome.verdict == NOT_IMPLEMENTED and "kvm_amd avic=Y" in outcome.why
    assert apic.apicv_update(control=True).verdict == "absent"
    # AVIC has the page but no set_apic_access_page_addr: kvm_unmap_gfn_range() never raises the reload
    reload = apic.apic_page_reload()
    assert reload.verdict == UNREACHABLE and "kvm_amd avic=Y" in reload.why and "flexpriority" in reload.why


def test_a_page_reload_without_kvms_mapping_found_says_why(kvm, monkeypatch):
    switches = {"kvm_intel enable_apicv": "N", "kvm_intel flexpriority": "Y"}
    monkeypatch.setattr(apic, "apicv_parameters", lambda sys_module=apic.SYS_MODULE: switches)
    monkeypatch.setattr(apic, "apic_access_mapping", lambda before, after: (None, []))
    outcome = apic.apic_page_reload()
    assert outcome.verdict == NOT_IMPLEMENTED and "cannot tell which is KVM's APIC-access page" in outcome.why
    assert apic.apic_page_reload(control=True).verdict == "absent"


def test_dropping_kvms_apic_access_page_makes_the_next_entry_fault_it_back(kvm):
    parameters = apic.apicv_parameters()
    outcome = apic.apic_page_reload()
    control = apic.apic_page_reload(control=True)
    if parameters.get("kvm_intel flexpriority") not in ("Y", "1"):
        assert outcome.verdict == control.verdict == UNREACHABLE
        assert "APIC-access page" in outcome.why or "flexpriority" in outcome.why
        return
    assert outcome.verdict == OBSERVED, outcome.steps
    evidence = outcome.evidence
    assert "/dev/zero (deleted)" in evidence["mapping"] and "4 KiB" in evidence["mapping"]
    assert evidence["rss_kb"]["before_run"] == 0 and evidence["rss_kb"]["after_run"] == 4
    assert evidence["unmap_events"] in (None, 1) and evidence["guest_ok"]
    assert control.verdict == "absent", control.steps
    rss = control.evidence["rss_kb"]
    assert rss["ready"] == rss["before_run"] == rss["after_run"] == 4      # never dropped, never faulted again
    assert control.evidence["unmap_events"] in (None, 0) and control.evidence["guest_ok"]


def test_apicv_requests_say_what_this_host_lacks(kvm):
    parameters = apic.apicv_parameters()
    apicv_on = any(v in ("Y", "1") for k, v in parameters.items() if not k.endswith("flexpriority"))
    update = apic.apicv_update()
    if not apicv_on:
        assert update.verdict == UNREACHABLE and "read now" in update.why
    intel_page = parameters.get("kvm_intel flexpriority") in ("Y", "1")
    reload = apic.apic_page_reload()
    if not intel_page:
        assert reload.verdict == UNREACHABLE and "kvm_intel" in reload.why


NO_SPIN_GUEST = f"""
        mov ${XAPIC_BASE:#x}, %ebx
        out %al, ${PORT_READY:#x}
tpr_read:
        mov {ApicReg.TPR:#x}(%rbx), %eax
1:      out %al, ${PORT_HANDLER:#x}       # an exit right after the access
        jmp 1b
"""


def test_a_tpr_report_overtaken_by_another_exit_carries_that_exits_bytes(kvm):
    """Why the scenario's guest spins: KVM writes the payload when it makes the request, not when it exits."""
    with machine("split") as (vm, vcpu):
        code = x86.load_code(vcpu, NO_SPIN_GUEST)
        assert is_port(PORT_READY)(vcpu.run())
        vcpu.tpr_access_reporting(True)
        exits = [vcpu.run(), vcpu.run()]
    kinds = [type(exit) for exit in exits]
    if kinds == [TprAccessExit, IoExit]:                # the request was handled at the next entry
        assert exits[0] == TprAccessExit(code.symbols["tpr_read"], False)
    else:                                               # the OUT's exit came first, in the same batch
        assert kinds == [IoExit, TprAccessExit], exits
        io = exits[0]
        assert isinstance(io, IoExit) and io.port == PORT_HANDLER
        # kvm_run's union now holds struct kvm_run.io: direction, size, port, count where rip was
        assert exits[1] == TprAccessExit(1 | 1 << 8 | PORT_HANDLER << 16 | 1 << 32, True)
