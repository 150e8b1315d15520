"""Hyper-V requests (HV_CRASH, HV_RESET, HV_EXIT, HV_STIMER) and the core API they need.

The typed KVM_EXIT_HYPERV, KVM_GET_SUPPORTED_HV_CPUID and per-vCPU
KVM_ENABLE_CAP; then each scenario's evidence against its control. On a host
without Hyper-V emulation both runs report the missing capability.
"""

from __future__ import annotations

import pytest

from pykvm import Cap
from pykvm.core import exits
from pykvm.core.binding import ffi
from pykvm.core.constants import HypervExitType, SystemEventType
from pykvm.core.errors import CapabilityMissing, InvalidArgument, KvmError
from pykvm.requests.scenarios import hyperv
from pykvm.testing import scenario_and_control

HV_SIGNATURE = 0x31237648     # "Hv#1" in leaf 0x40000001 EAX


def test_hyperv_exit_decodes_the_synic_and_hcall_fields():
    run = ffi.new("struct kvm_run *")
    run.hyperv.type = HypervExitType.SYNIC
    synic = run.hyperv.u.synic
    synic.msr, synic.control, synic.evt_page, synic.msg_page = 0x40000083, 1, 0x21001, 0x20001
    exit = exits._hyperv(None, run)
    assert exit.type == HypervExitType.SYNIC and exit.msr == 0x40000083
    assert (exit.control, exit.evt_page, exit.msg_page, exit.input) == (1, 0x21001, 0x20001, 0)
    run.hyperv.type = HypervExitType.HCALL
    run.hyperv.u.hcall.params = [7, 8]
    exit = exits._hyperv(None, run)
    assert exit.type == HypervExitType.HCALL and exit.params == (7, 8) and exit.msr == 0
    assert ffi.sizeof("struct kvm_hyperv_exit") == 56 and exits.DECODERS[exits.ExitReason.HYPERV] is exits._hyperv


def test_supported_hv_cpuid(kvm):
    if not kvm.check_extension(Cap.SYS_HYPERV_CPUID):
        with pytest.raises(CapabilityMissing, match="KVM_CAP_SYS_HYPERV_CPUID"):
            kvm.supported_hv_cpuid
        return
    leaves = {entry.function: entry for entry in kvm.supported_hv_cpuid}
    assert leaves[0x40000001].eax == HV_SIGNATURE
    assert min(leaves) == 0x40000000 and leaves[0x40000000].eax >= 0x40000005


def test_vcpu_enable_cap_checks_and_names_the_ioctl(vcpu):
    with pytest.raises(InvalidArgument, match="struct kvm_enable_cap has 4"):
        vcpu.enable_cap(Cap.HYPERV_SYNIC, 0, 0, 0, 0, 0)
    with pytest.raises(KvmError, match="KVM_ENABLE_CAP"):   # SynIC needs the in-kernel LAPIC (or is absent)
        vcpu.enable_cap(Cap.HYPERV_SYNIC)


def test_crash_msr_gives_a_crash_event_with_its_parameters(kvm):
    if (runs := scenario_and_control(kvm, hyperv.hv_crash, Cap.SYS_HYPERV_CPUID)) is None:
        return                                  # no Hyper-V emulation here (kvm_pvm): said, checked in _runs
    outcome, control = runs
    assert outcome.evidence["system_event"] == SystemEventType.CRASH
    assert outcome.evidence["params"] == list(hyperv.CRASH_PARAMS)
    assert control.evidence["system_event"] is None and control.evidence["params"] == list(hyperv.CRASH_PARAMS)
    assert (outcome.verdict, control.verdict) == ("observed", "absent")


def test_reset_msr_gives_a_reset_event(kvm):
    if (runs := scenario_and_control(kvm, hyperv.hv_reset, Cap.SYS_HYPERV_CPUID)) is None:
        return
    outcome, control = runs
    assert outcome.evidence["system_event"] == SystemEventType.RESET
    assert control.evidence["system_event"] is None
    assert (outcome.verdict, control.verdict) == ("observed", "absent")


def test_scontrol_write_exits_to_userspace(kvm):
    if (runs := scenario_and_control(kvm, hyperv.hv_exit, Cap.SYS_HYPERV_CPUID, Cap.HYPERV_SYNIC)) is None:
        return
    outcome, control = runs
    assert outcome.evidence == {"hyperv_exit": True, "type": HypervExitType.SYNIC, "msr": 0x40000080, "control": 1}
    assert control.evidence["hyperv_exit"] is False
    assert (outcome.verdict, control.verdict) == ("observed", "absent")


def test_synthetic_timer_posts_its_message(kvm):
    if (runs := scenario_and_control(kvm, hyperv.hv_stimer, Cap.SYS_HYPERV_CPUID, Cap.HYPERV_SYNIC)) is None:
        return
    outcome, control = runs
    evidence, message = outcome.evidence, outcome.evidence["message"]
    assert message["type"] == hyperv.HVMSG_TIMER_EXPIRED and message["timer_index"] == 0
    assert message["payload_size"] == 24 and message["expiration_time"] == evidence["count"] > 0
    assert message["delivery_time"] >= evidence["count"]
    assert evidence["config_after"] & 1 == 0                   # a one-shot timer disables itself on expiry
    assert evidence["vector_pending"]                          # SINT2's vector reached the LAPIC's IRR
    if evidence["trace"] is not None:
        assert evidence["trace"]["kvm:kvm_hv_stimer_start_one_shot"] >= 1
        assert evidence["trace"]["kvm:kvm_hv_stimer_expiration"] >= 1
    assert outcome.verdict == "observed"
    assert control.evidence["message"]["type"] == 0 and control.evidence["count"] == 0
    assert not control.evidence["vector_pending"]
    if control.evidence["trace"] is not None:
        assert control.evidence["trace"]["kvm:kvm_hv_stimer_expiration"] == 0
    assert control.verdict == "absent"
