"""Host detection, the recorded host differences, and the measured facts' cache key and seals (no KVM needed)."""

import dataclasses
import json
import os

import pytest

from pykvm.core.errors import InvalidArgument
from pykvm.hosts import facts, limits, measurement, vendor
from pykvm.hosts.probes import Observation, Result
from pykvm.hosts.probes.exits import NotReady
from pykvm.hosts.probes.nmi import NmiBlocking
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
    # no window exits, RIP past the out, IF ignored and NMIs held to the next entry (each per mode, the
    # protected-mode NMI handler's IRET failing), no ISR, LAPIC vectors at entries, INT n, UD2, IRET
    assert len(info.differences()) == 16
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


def test_per_mode_facts_are_named_by_mode():
    info = facts.host_info(VendorModule.PVM)
    assert info.in_mode("nmi_blocked_until_iret", "long") is info.nmi_blocked_until_iret
    assert info.in_mode("nmi_blocked_until_iret", "real") is info.nmi_blocked_until_iret_real
    with pytest.raises(InvalidArgument, match="'io_exit_rip_at_out_real' is no host fact.*nmi_blocked_until_iret"):
        info.in_mode("io_exit_rip_at_out", "real")
    with pytest.raises(InvalidArgument, match="mode='vm86' is not a CPU mode"):
        info.in_mode("nmi_blocked_until_iret", "vm86")


def test_measured_facts_follow_the_measurement_and_name_the_record():
    seen = {"nmi_blocking_real": Observation(NmiBlocking.NESTED, "nmi.masked=0"),
            "interrupt_not_ready_real": Observation(NotReady.DELIVERED_WITH_IF_CLEAR, "record"),
            "nmi_blocking": Observation(Result.PROBE_FAILED, "boom")}
    info = facts.measured_info(VendorModule.INTEL, seen)
    nested = info.nmi_blocked_until_iret_real
    assert not nested and nested.verified and nested.outcome == NmiBlocking.NESTED
    assert nested.differs_from_record and nested.recorded == NmiBlocking.HELD_UNTIL_IRET
    assert "nmi_blocking_real measured 'unmasked in the handler: nested' on this host; pykvm's record for " \
           "kvm_intel has 'held until IRET'" == nested.reason
    assert set(info.departures_from_record()) == {"nmi_blocked_until_iret_real", "interrupt_held_while_not_ready_real"}
    # a probe that failed, or never ran, leaves the record's outcome, marked as not measured here
    failed, absent = info.nmi_blocked_until_iret, info.sends_irq_window_exits
    assert failed.outcome == NmiBlocking.HELD_UNTIL_IRET and not failed.verified and "probe failed" in failed.reason
    assert absent.holds and not absent.verified and "irq_window not measured on this host" in absent.reason


def _sys_module(tmp_path, parameters):
    for name, value in parameters.items():
        module, _, parameter = name.partition(".")
        (tmp_path / module / "parameters").mkdir(parents=True, exist_ok=True)
        (tmp_path / module / "parameters" / parameter).write_text(value + "\n")
    return str(tmp_path)


def test_the_key_holds_the_vendor_modules_parameters(tmp_path):
    sys_module = _sys_module(tmp_path, {"kvm_intel.ept": "N", "kvm_intel.unrestricted_guest": "N",
                                        "kvm.halt_poll_ns": "200000"})
    key = measurement.host_key(sys_module=sys_module)
    assert key.module == "kvm_intel" and key.parameters == {"kvm_intel.ept": "N", "kvm_intel.unrestricted_guest": "N"}
    assert key.describe_parameters() == "kvm_intel: ept=N unrestricted_guest=N"
    other = measurement.host_key(sys_module=_sys_module(tmp_path, {"kvm_intel.ept": "Y"}))
    assert other.digest != key.digest


def _key(**changes):
    return dataclasses.replace(measurement.HostKey("6.12 #1", "kvm_intel", {"kvm_intel.ept": "N"}, "code"), **changes)


SEEN = {"nmi_blocking_real": Observation(NmiBlocking.NESTED, "nmi.masked=0"),
        "irq_window": Observation(None, "CapabilityMissing")}


def test_the_cache_reads_back_what_it_stored_and_prunes_other_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    old = measurement.store(_key(kernel="6.1 #1"), SEEN)
    path = measurement.store(_key(), SEEN)
    assert path.parent == tmp_path / "pykvm" / "host-facts" and not old.exists()
    cached = measurement.read(_key())
    assert (cached.observations, cached.tampered, cached.stale) == (SEEN, {}, "")
    assert measurement.read(_key(kernel="6.1 #1")) is None


def test_other_keys_of_this_kernel_stay_up_to_the_bound(tmp_path, monkeypatch):
    """Two checkouts (probe code) or module parameters switched back and forth keep their files; the oldest
    beyond KEYS_PER_KERNEL go, and the current key's file is never among them."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    paths = []
    for n in range(measurement.KEYS_PER_KERNEL + 2):       # file times are coarse: give each store its own second
        paths.append(measurement.store(_key(code=f"checkout-{n}"), SEEN))
        os.utime(paths[-1], ns=(n * 10**9,) * 2)
    assert [path.exists() for path in paths] == [False, False] + [True] * measurement.KEYS_PER_KERNEL
    measurement.store(_key(code="checkout-1"), SEEN)        # a checkout in use again: now the newest
    kept = sorted(path.name for path in paths if path.exists())
    expected = [paths[1], *paths[-(measurement.KEYS_PER_KERNEL - 1):]]
    assert kept == sorted(path.name for path in expected)
    assert measurement.read(_key(code="checkout-1")).observations == SEEN


def test_a_file_for_another_key_is_stale_and_a_changed_entry_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = measurement.store(_key(), SEEN)
    moved = measurement.read(_key(parameters={"kvm_intel.ept": "Y"}), path)
    assert moved.stale == "written for another kernel, module, parameters or probe code" and moved.observations == {}
    data = json.loads(path.read_text())
    data["entries"]["nmi_blocking_real"]["outcome"] = "held until IRET"
    data["entries"]["irq_window"]["outcome"] = "sometimes"
    data["entries"]["irq_window"]["seal"] = measurement.seal(_key(), "irq_window", "sometimes", "CapabilityMissing")
    path.write_text(json.dumps(data))
    cached = measurement.read(_key())
    assert cached.observations == {}
    assert cached.tampered == {
        "irq_window": "'sometimes' is no outcome of probe irq_window",
        "nmi_blocking_real": "holds 'held until IRET', but its seal does not match: the entry was changed after it "
                             "was measured"}
    with pytest.raises(measurement.HostFactsCacheError, match=r"host-facts/kvm_intel-\w+\.json: the cached host "
                                                              r"facts were changed.*irq_window: 'sometimes'"):
        measurement.load(None, _key())
