"""``python -m pykvm.doctor``, its probes and the conformance table they are judged against.

The hardware tests run every probe on this host and assert that the outcome is
the one pykvm's table records for this vendor module (kvm_pvm, or kvm_amd under
QEMU TCG): the table is where "what this host does" is defined, for the doctor
and for the host facts the other tests branch on.
"""

import dataclasses
import json
from pathlib import Path

import pytest

from pykvm import doctor
from pykvm.hosts import conformance, facts, probes
from pykvm.hosts.vendor import VendorModule

DOCS = Path(__file__).resolve().parent.parent / "docs" / "host-conformance.md"


@pytest.fixture(scope="module")
def observations(kvm_available):
    import pykvm
    with pykvm.Kvm() as kvm:
        return probes.run_probes(kvm)


def test_every_host_fact_is_defined_by_exactly_one_row():
    names = [row.fact for row in conformance.EXPECTATIONS.values() if row.fact]
    fields = [f.name for f in dataclasses.fields(facts.HostInfo) if f.name != "vendor"]
    assert sorted(names) == sorted(fields)


def test_facts_follow_the_table():
    row = conformance.EXPECTATIONS["irq_window"]
    for vendor in VendorModule:
        fact = facts.host_info(vendor).sends_irq_window_exits
        known = row.known(vendor)
        assert (fact.holds, fact.verified, fact.reason) == (known.outcome == row.expected,
                                                            known.verified, known.source)


def test_unrecorded_hosts_get_the_expectation_labelled_unverified():
    for row in conformance.EXPECTATIONS.values():
        intel = row.known(VendorModule.INTEL)
        assert not intel.verified and "unverified" in intel.source
        assert not row.known(VendorModule.UNKNOWN).verified


def test_judge_verdicts():
    pvm = VendorModule.PVM
    assert conformance.judge("irq_window", "exit after sti; nop", "", pvm).verdict == "conforms"
    differs = conformance.judge("irq_window", "no window exit", "", pvm)
    assert differs.verdict == "differs" and differs.matches_record
    assert "ready_for_interrupt_injection" in differs.explanation
    unsupported = conformance.judge("sti_shadow", None, "CapabilityMissing: ...", pvm)
    assert unsupported.verdict == "unsupported" and not unsupported.matches_record


def test_scenarios_declare_exactly_the_probes_of_the_table():
    declared = [probe for _, names in probes.SCENARIOS for probe in names]
    assert sorted(declared) == sorted(conformance.EXPECTATIONS)


def test_missing_capability_marks_probes_unsupported_and_errors_mark_them_failed(monkeypatch):
    from pykvm.core.errors import CapabilityMissing

    def lacks(kvm):
        raise CapabilityMissing("needs KVM_CAP_X")

    def breaks(kvm):
        raise RuntimeError("boom")
    monkeypatch.setattr(probes, "SCENARIOS", [(lacks, ("sti_shadow", "mov_ss_shadow")),
                                              (breaks, ("triple_fault",))])
    observed = probes.run_probes(kvm=None)
    assert {k: v.outcome for k, v in observed.items()} == {
        "sti_shadow": None, "mov_ss_shadow": None, "triple_fault": "probe failed"}
    assert "KVM_CAP_X" in observed["sti_shadow"].detail and "boom" in observed["triple_fault"].detail
    verdict = conformance.judge("triple_fault", "probe failed", "boom", VendorModule.PVM).verdict
    assert verdict == "probe failed"


def test_docs_table_is_generated_from_the_table():
    assert DOCS.read_text() == doctor.DOCS_HEADER + doctor.markdown_table() + "\n", \
        "docs/host-conformance.md is stale: regenerate it with python -m pykvm.doctor --markdown"


def test_every_probe_has_a_row_and_no_probe_failed(observations):
    assert set(observations) == set(conformance.EXPECTATIONS)
    failed = {k: v.detail for k, v in observations.items() if v.outcome == "probe failed"}
    assert failed == {}


@pytest.mark.parametrize("probe", list(conformance.EXPECTATIONS))
def test_probe_outcome_is_the_one_recorded_for_this_host(observations, probe):
    vendor = facts.detect_vendor()
    row = conformance.EXPECTATIONS[probe]
    observed = observations[probe]
    # kvm_pvm / kvm_amd: measured outcomes; elsewhere the architectural expectation (unverified).
    assert observed.outcome == row.known(vendor).outcome, (
        f"{probe} on {vendor.value}: {observed.detail} ({row.known(vendor).source})")


def test_doctor_prints_identity_capabilities_and_probes(kvm_available, capsys):
    assert doctor.main([]) == 0
    out = capsys.readouterr().out
    for section in ("== host", "== capabilities", "== probes", "== summary"):
        assert section in out
    assert f"vendor module   {facts.detect_vendor().value}" in out
    assert "KVM_CAP_IRQCHIP" in out and "0 probe failed" in out


def test_doctor_json(kvm_available, capsys):
    assert doctor.main(["--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["host"]["vendor"] == facts.detect_vendor().value and data["host"]["api_version"] == 12
    assert {p["probe"] for p in data["probes"]} == set(conformance.EXPECTATIONS)
    assert all(p["verdict"] in ("conforms", "differs", "unsupported") for p in data["probes"])


def test_doctor_without_kvm_says_why_and_exits_2(monkeypatch, capsys):
    real_kvm = doctor.Kvm
    monkeypatch.setattr(doctor, "Kvm", lambda: real_kvm("/nonexistent/kvm"))
    assert doctor.main([]) == 2
    assert "/nonexistent/kvm" in capsys.readouterr().err


def test_probes_leak_no_fds_or_threads(kvm):
    import psutil
    process = psutil.Process()
    probes.run_probes(kvm)                         # warm up: lazily opened files, the kick handler
    fds, threads = process.num_fds(), process.num_threads()
    probes.run_probes(kvm)
    assert (process.num_fds(), process.num_threads()) == (fds, threads)
