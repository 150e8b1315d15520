"""Host detection and the documented host differences (no KVM needed)."""

import pytest

from pykvm.hosts import facts, limits, vendor
from pykvm.hosts.vendor import VendorModule


@pytest.mark.parametrize("module", ["kvm_intel", "kvm_amd", "kvm_pvm"])
def test_vendor_from_sys_module(tmp_path, module):
    (tmp_path / "kvm").mkdir()
    (tmp_path / module).mkdir()
    assert vendor.detect_vendor(str(tmp_path)) == VendorModule(module)


def test_no_vendor_module_is_unknown(tmp_path):
    assert vendor.detect_vendor(str(tmp_path)) == VendorModule.UNKNOWN


def test_pvm_differences_are_named_and_measured():
    info = facts.host_info(VendorModule.PVM)
    assert not info.sends_irq_window_exits and info.sends_irq_window_exits.verified
    assert info.long_mode_interrupt_shadow          # honoured under single-step (doctor probe)
    assert len(info.differences()) == 8
    assert any("KVM_EXIT_IRQ_WINDOW_OPEN" in text for text in info.differences())


def test_intel_facts_are_measured_under_bochs():
    info = facts.host_info(VendorModule.INTEL)
    assert info.sends_irq_window_exits and info.sends_irq_window_exits.verified
    assert "measured on kvm_intel" in info.sends_irq_window_exits.reason
    assert "Bochs 3.0" in info.sends_irq_window_exits.reason
    assert info.single_step_stops_in_sti_shadow and info.nmi_delivered_at_iret


def test_an_unknown_module_gets_the_architecture_unverified():
    info = facts.host_info(VendorModule.UNKNOWN)
    assert info.sends_irq_window_exits and not info.sends_irq_window_exits.verified
    assert info.differences() == []


def test_entry_failure_decoding_per_vendor():
    amd = facts.host_info(VendorModule.AMD)
    assert "VMCB" in limits.explain_entry_failure(amd, 0xFFFFFFFFFFFFFFFF)
    intel = facts.host_info(VendorModule.INTEL)
    text = limits.explain_entry_failure(intel, 0x80000021)
    assert "invalid guest state" in text and "RFLAGS.IF=0" in text
    assert "basic exit reason 7" in limits.explain_entry_failure(intel, 0x80000007)
    # without bit 31 the number is VMLAUNCH's VM-instruction error (measured under Bochs: an injected
    # #UD with has_error_code=1 ended in KVM_EXIT_FAIL_ENTRY, reason 0x7)
    text = limits.explain_entry_failure(intel, 0x7)
    assert "VM-instruction error 7" in text and "has_error_code" in text
