"""KVM's requests: the core API the scenarios use, each scenario against its control, and the CLI.

Every scenario that this host's table says is ``observed`` must observe its
evidence now, and its control run (no trigger) must not; the table's other
verdicts are compared too, so a host that changes shows up here.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import pykvm
from pykvm import Cap, x86
from pykvm.core import exits
from pykvm.core.binding import ffi
from pykvm.core.constants import ClockFlag, MsrExitReason, MsrFilterAccess
from pykvm.core.errors import KvmError
from pykvm.core.ioctls import Ioctl
from pykvm.core.state import ClockData, MsrFilterRange, from_c
from pykvm.hosts.vendor import VendorModule, detect_vendor
from pykvm.requests import BY_NAME, NOT_IMPLEMENTED, OBSERVED, REQUESTS, UNREACHABLE, expected, run_request
from pykvm.requests.scenarios import DATA, SCENARIOS
from pykvm.requests.scenarios.clock import read_pvclock

HEADER_PROGRAM = r"""
#include <stdio.h>
#include <linux/kvm.h>
int main(void) {
    printf("%lu %lu %lu %lu %lu %lu %lu\n", (unsigned long)KVM_SET_CLOCK, (unsigned long)KVM_GET_CLOCK,
           (unsigned long)KVM_KVMCLOCK_CTRL, (unsigned long)KVM_X86_SET_MSR_FILTER,
           (unsigned long)KVM_GET_DIRTY_LOG, (unsigned long)KVM_TPR_ACCESS_REPORTING, (unsigned long)KVM_SMI);
    return 0;
}
"""


def test_ioctl_numbers_match_the_header(tmp_path):
    source = tmp_path / "numbers.c"
    source.write_text(HEADER_PROGRAM)
    try:
        subprocess.run(["cc", "-o", str(tmp_path / "numbers"), str(source)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"no C compiler with <linux/kvm.h>: {exc}")
    numbers = [int(n) for n in subprocess.run([str(tmp_path / "numbers")], capture_output=True, text=True,
                                              check=True).stdout.split()]
    ours = [Ioctl[name] for name in ("SET_CLOCK", "GET_CLOCK", "KVMCLOCK_CTRL", "X86_SET_MSR_FILTER",
                                              "GET_DIRTY_LOG", "TPR_ACCESS_REPORTING", "SMI")]
    assert numbers == [int(n) for n in ours]


def test_struct_layouts():
    # Sizes fixed by the x86-64 ABI (the request numbers above encode them).
    sizes = {"struct kvm_clock_data": 48, "struct kvm_msr_filter_range": 24, "struct kvm_msr_filter": 392,
             "struct kvm_dirty_log": 16, "struct kvm_tpr_access_ctl": 40}
    assert {name: ffi.sizeof(name) for name in sizes} == sizes
    cdata = ffi.new("struct kvm_clock_data *", {"clock": 123, "flags": ClockFlag.TSC_STABLE, "realtime": 7,
                                                "host_tsc": 9})
    data = from_c(ClockData, cdata)
    assert data == ClockData(123, ClockFlag.TSC_STABLE, 7, 9) and data.tsc_stable
    assert not ClockData(123, ClockFlag.REALTIME).tsc_stable
    assert MsrFilterRange.deny(0x10).padded_bitmap() == bytes(8)
    assert len(MsrFilterRange(1, 0, 65, b"\xff").padded_bitmap()) == 16


def test_tpr_access_and_ioapic_eoi_exits_decode():
    run = ffi.new("struct kvm_run *")
    run.tpr_access.rip, run.tpr_access.is_write = 0x10042, 1
    assert exits._tpr_access(None, run) == exits.TprAccessExit(0x10042, True)
    run.eoi.vector = 0x45
    assert exits._ioapic_eoi(None, run) == exits.IoapicEoiExit(0x45)


# ---- the core wrappers on KVM ---------------------------------------------------

@pytest.mark.requires_cap(Cap.ADJUST_CLOCK)
def test_get_and_set_clock(vm):
    before = vm.get_clock().clock
    vm.set_clock(before + 5_000_000_000)
    after = vm.get_clock().clock
    assert 5_000_000_000 <= after - before < 6_000_000_000


def test_kvmclock_ctrl_needs_the_guest_clock(vm, vcpu):
    with pytest.raises(KvmError, match="KVM_KVMCLOCK_CTRL"):
        vcpu.kvmclock_ctrl()
    x86.load_code(vcpu, f"mov $0x4b564d01, %ecx\nmov ${DATA | 1}, %eax\nxor %edx, %edx\nwrmsr\n"
                        "out %al, $0x10\nhlt\n")
    vcpu.run()
    vcpu.kvmclock_ctrl()
    vcpu.run()
    assert read_pvclock(vm)["flags"] & 2            # PVCLOCK_GUEST_STOPPED


@pytest.mark.requires_cap(Cap.X86_USER_SPACE_MSR, Cap.X86_MSR_FILTER)
def test_msr_filter_sends_a_denied_read_to_userspace(vm, vcpu):
    vm.enable_user_space_msr()
    vm.set_msr_filter([MsrFilterRange.deny(0x10, MsrFilterAccess.READ)])
    x86.load_code(vcpu, "mov $0x10, %ecx\nrdmsr\nout %al, $0x10\nhlt\n")
    exit = vcpu.run()
    assert isinstance(exit, pykvm.MsrExit) and exit.index == 0x10
    assert exit.msr_reason == MsrExitReason.FILTER
    vm.set_msr_filter()                             # no ranges, default allow: the filter is gone


def test_dirty_log_and_slot_removal(vm, vcpu):
    slot = vm.memory.add_slot(0x2000000, 0x4000)
    vm.memory.set_dirty_logging(slot.slot, True)
    x86.load_code(vcpu, "movq $1, 0x2001000\nout %al, $0x10\nhlt\n")
    vcpu.run()
    assert vm.get_dirty_log(slot.slot)[0] == 0b10   # page 1 of the slot
    assert vm.get_dirty_log(slot.slot)[0] == 0       # the log was reset by the fetch
    vm.memory.remove_slot(slot.slot)
    assert [s.slot for s in vm.memory.slots] == [0]
    assert vm.memory.add_slot(0x3000000, 0x1000).slot == slot.slot   # the number is free again
    with pytest.raises(ValueError, match="no such memory slot"):
        vm.memory.remove_slot(7)


@pytest.mark.parametrize("vm", ["split"], indirect=True)
@pytest.mark.requires_cap(Cap.SPLIT_IRQCHIP)
def test_tpr_access_reporting_is_accepted(vm):
    vcpu = vm.create_vcpu()
    vcpu.tpr_access_reporting(True)
    vcpu.tpr_access_reporting(False)


def test_smi_needs_smm(kvm, vcpu):
    if kvm.check_extension(Cap.X86_SMM):
        vcpu.smi()
        assert vcpu.events.smi.pending
    else:
        with pytest.raises(pykvm.core.errors.CapabilityMissing):
            vcpu.smi()


# ---- the scenarios -------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_scenario_matches_the_table_and_its_control_shows_nothing(kvm, name):
    request = BY_NAME[name]
    want = expected(request)
    outcome = SCENARIOS[name]()
    if want != NOT_IMPLEMENTED:
        assert outcome.verdict == want, (outcome.why, outcome.evidence, outcome.steps)
    control = SCENARIOS[name](control=True)
    if outcome.verdict == UNREACHABLE:                # the host lacks what it needs: so does the control
        assert control.verdict == UNREACHABLE and outcome.why, outcome
        return
    assert control.verdict == "absent", (control.evidence, control.steps)
    evidence = outcome.evidence
    if outcome.verdict != OBSERVED:
        return
    if name == "EVENT":
        assert evidence["handler_ran"] and evidence["irq_injections"] >= 1 and evidence["req_event"] >= 1
        assert not control.evidence["handler_ran"] and control.evidence["irq_injections"] == 0
    elif name == "NMI":
        assert evidence["handler_ran"] and evidence["nmi_injections"] >= 1
        assert control.evidence["nmi_injections"] == 0
    elif name == "TRIPLE_FAULT":
        assert evidence["shutdown"] and not evidence["guest_ran"]
        assert not control.evidence["shutdown"]
    elif name == "MSR_FILTER_CHANGED":
        assert evidence["reason"] == MsrExitReason.FILTER and not control.evidence["msr_exit"]
    elif name == "CLOCK_UPDATE":
        assert evidence["version_change"] >= 2 and evidence["version_change"] % 2 == 0
        assert 10e9 <= evidence["system_time_jump"] < 15e9 and evidence["guest_stopped"]   # + run time (TCG)
        assert evidence["pvclock_update_events"] in (None,) or evidence["pvclock_update_events"] >= 1
        assert control.evidence["system_time_jump"] < 1e9 and not control.evidence["guest_stopped"]
    elif name == "MMU_FREE_OBSOLETE_ROOTS":
        assert evidence["zap_all_fast"] == 1 and evidence["new_roots"] >= 1
        assert control.evidence["zap_all_fast"] == 0
    elif name == "TLB_FLUSH":
        assert evidence["remote_tlb_flush_requests"] >= 1 and evidence["tlb_flush"] >= 1
        assert control.evidence["remote_tlb_flush_requests"] == 0
    elif name == "STEAL_UPDATE":
        # each KVM_RUN loads the vCPU: one update (+2) at least, more if the host preempted the
        # vCPU thread during the run (seen once in CI with the machine busy)
        versions = evidence["versions"]
        assert all(b - a >= 2 and (b - a) % 2 == 0 for a, b in zip(versions, versions[1:], strict=False))
        assert set(control.evidence["versions"]) == {0}


def test_unimplemented_rows_say_so(kvm):
    for request in REQUESTS:
        if request.name not in SCENARIOS:
            row = run_request(request)
            assert row.verdict == NOT_IMPLEMENTED, row


def _table_observed(vendor, shadow: bool = False) -> int:
    return sum((r.amd_shadow if shadow and r.amd_shadow else r.expected.get(vendor)) == OBSERVED for r in REQUESTS)


def test_the_table_expects_enough_requests_observed():
    # measured before and held to by every host's run below: kvm_pvm; kvm_amd as loaded by
    # default (npt=Y); kvm_amd with npt=0 (tcg-amd --kvm-amd-parameters npt=0), which adds the
    # shadow-paging-only requests; kvm_intel under Bochs (bochs-intel: EPT, PML, flexpriority, one CPU)
    assert _table_observed(VendorModule.PVM) >= 17
    assert _table_observed(VendorModule.AMD) >= 24
    assert _table_observed(VendorModule.AMD, shadow=True) >= 25
    assert _table_observed(VendorModule.INTEL) >= 24


# The command's listing and JSON; what each scenario observes on this host is checked per scenario above.
@pytest.mark.host_independent
def test_list_mode_lists_every_request(kvm):
    want = sum(expected(r) == OBSERVED for r in REQUESTS)          # this host, as loaded now
    result = subprocess.run([sys.executable, "-m", "pykvm.requests", "--json", "--min-observed", str(want)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["observed"] == sum(row["verdict"] == OBSERVED for row in report["requests"]) >= want
    assert report["host"] == detect_vendor().value
    assert [row["name"] for row in report["requests"]] == [r.name for r in REQUESTS]
    assert len(REQUESTS) == 32 and len({r.name for r in REQUESTS}) == 32
    for row in report["requests"]:
        assert row["verdict"] in (OBSERVED, "raised, no visible effect here", "not reachable here",
                                  NOT_IMPLEMENTED)


@pytest.mark.host_independent        # the command's words; the scenario itself is checked above
def test_show_answers_the_mmu_question(kvm):
    result = subprocess.run([sys.executable, "-m", "pykvm.requests", "show", "MMU_FREE_OBSOLETE_ROOTS"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "control, without it: absent" in result.stdout
    assert "KVM_REQ_MMU_FREE_OBSOLETE_ROOTS on all vCPUs" in result.stdout


def test_show_refuses_an_unknown_name():
    result = subprocess.run([sys.executable, "-m", "pykvm.requests", "show", "NOPE"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "unknown request" in result.stderr


def test_a_scenario_step_that_never_ends_times_out_and_says_why():
    # A guest halted with IF=0 waits for ever: run_until kicks it at its deadline instead of hanging the table.
    from pykvm.core.errors import RunTimeout
    from pykvm.requests.scenarios.common import ScenarioRecorder, is_port, machine, run_until
    with machine(irqchip="kernel") as (vm, vcpu):
        x86.load_code(vcpu, "cli\nhlt\nout %al, $0x10\n")
        t = ScenarioRecorder("TEST", control=False)
        with pytest.raises(RunTimeout, match=r"TEST: the vCPU did not reach the awaited exit within 0.3 s, nor in "
                                             r"0.3 s more .*mp_state HALTED, IF=0.*the awaited interrupt had not come"):
            run_until(vcpu, t, is_port(0x10), deadline=0.3)
