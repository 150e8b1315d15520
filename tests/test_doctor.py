"""``python -m pykvm.doctor``, its probes and the conformance table they are judged against.

The hardware tests run every probe on this host and assert that the outcome is
the one pykvm's table records for this vendor module (kvm_pvm, kvm_amd under
QEMU TCG, or kvm_intel under Bochs): the table is where "what this host does" is defined, for the doctor
and for the host facts the other tests branch on.
"""

import dataclasses
import json
import types
from pathlib import Path

import pytest

from pykvm import doctor
from pykvm.core.errors import CapabilityMissing, GuestError
from pykvm.core.exits import InternalErrorExit
from pykvm.guests import LogRecord
from pykvm.hosts import conformance, facts, probes
from pykvm.hosts.probes import Observation, Outcome, Result, Scenario
from pykvm.hosts.probes.exits import IrqWindow
from pykvm.hosts.probes.harness import MSI_VECTOR, run_once, where_taken
from pykvm.hosts.probes.shadows import Shadow
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


def test_every_vendor_module_is_measured_and_an_unknown_one_gets_the_expectation_unverified():
    for row in conformance.EXPECTATIONS.values():
        for vendor in (VendorModule.PVM, VendorModule.AMD, VendorModule.INTEL):
            known = row.known(vendor)
            assert known.verified and known.source.startswith(f"measured on {vendor.value} "), row.probe
        unknown = row.known(VendorModule.UNKNOWN)
        assert not unknown.verified and unknown.outcome == row.expected and "not measured" in unknown.source


def test_where_the_emulator_under_kvm_intel_decided_the_record_says_so():
    step = conformance.EXPECTATIONS["step_sti_shadow"].known(VendorModule.INTEL).source
    assert "Bochs 2.7" in step and "shadow=0x0" in step and "0x2" in step and "27.3.4" in step
    not_ready = conformance.EXPECTATIONS["interrupt_not_ready"].known(VendorModule.INTEL).source
    assert "0x80000021" in not_ready and "enable_apicv=0" in not_ready


def test_nothing_measured_is_called_unverified():
    assert "unverified" not in DOCS.read_text()
    assert "unverified" not in doctor.DOCS_HEADER + doctor.markdown_table()


def test_judge_verdicts():
    pvm = VendorModule.PVM
    assert conformance.judge("irq_window", IrqWindow.AFTER_STI_NOP, "", pvm).verdict == "conforms"
    differs = conformance.judge("irq_window", IrqWindow.NO_EXIT, "", pvm)
    assert differs.verdict == "differs" and differs.matches_record
    assert "ready_for_interrupt_injection" in differs.explanation
    unsupported = conformance.judge("sti_shadow", None, "CapabilityMissing: ...", pvm)
    assert unsupported.verdict == "unsupported" and not unsupported.matches_record


def test_each_row_speaks_its_familys_outcomes_and_each_probe_has_one_row():
    rows = [row for scenario in probes.SCENARIOS for row in scenario.rows]
    assert len(rows) == len(conformance.EXPECTATIONS) == 23
    for row in rows:
        family = type(row.expected)
        assert issubclass(family, Outcome) and family is not Outcome, row.probe
        outcomes = [known.outcome for known in row.hosts.values()] + list(row.explanations)
        assert all(isinstance(outcome, family) for outcome in outcomes), row.probe
    phrases = [member.value for row in rows for member in type(row.expected)]
    assert Result.PROBE_FAILED.value not in phrases and Result.INTERNAL_ERROR.value not in phrases


def test_outcomes_print_and_serialise_as_their_phrases():
    assert str(Shadow.HELD) == f"{Shadow.HELD}" == "held for one instruction"
    assert json.loads(json.dumps({"observed": Shadow.HELD})) == {"observed": "held for one instruction"}


def _rows(*names):
    return tuple(conformance.EXPECTATIONS[name] for name in names)


def test_runner_turns_what_stopped_a_scenario_into_outcomes_and_never_raises():
    def lacks(kvm):
        raise CapabilityMissing("needs KVM_CAP_X")

    def breaks(kvm):
        [_one] = [1, 2]       # the kind of bug a differing host once exposed

    def emulation_fails(kvm):
        exit = InternalErrorExit(suberror=1, rip=0x1000, insn_bytes=b"\x0f\x0b")
        raise GuestError("KVM could not emulate the instruction at RIP 0x1000", exit)

    def two_probes(kvm):
        return Observation(Shadow.HELD, "a"), Observation(Shadow.HELD, "b")

    observed = probes.run_probes(None, [Scenario(lacks, _rows("sti_shadow", "mov_ss_shadow")),
                                        Scenario(breaks, _rows("triple_fault")),
                                        Scenario(emulation_fails, _rows("int3_long")),
                                        Scenario(two_probes, _rows("lapic_isr"))])
    assert {k: v.outcome for k, v in observed.items()} == {
        "sti_shadow": None, "mov_ss_shadow": None, "triple_fault": Result.PROBE_FAILED,
        "int3_long": Result.INTERNAL_ERROR, "lapic_isr": Result.PROBE_FAILED}
    assert "KVM_CAP_X" in observed["sti_shadow"].detail
    assert "ValueError" in observed["triple_fault"].detail
    assert "2 observations for 1 probes" in observed["lapic_isr"].detail
    verdict = conformance.judge("triple_fault", Result.PROBE_FAILED, "boom", VendorModule.PVM).verdict
    assert verdict == "probe failed"
    # An unexpected KVM_EXIT_INTERNAL_ERROR on an unmeasured host is a difference, with its evidence.
    internal = observed["int3_long"]
    verdict = conformance.judge("int3_long", internal.outcome, internal.detail, VendorModule.INTEL)
    assert verdict.verdict == "differs" and not verdict.matches_record
    assert "KVM_EXIT_INTERNAL_ERROR" in verdict.explanation and "RIP 0x1000" in internal.detail


def test_a_run_into_an_internal_error_raises_it_for_the_runner():
    exit = InternalErrorExit(suberror=1, rip=0x1000, explanation="KVM could not emulate the instruction")

    class Session:                     # its next exit is KVM_EXIT_INTERNAL_ERROR
        def run(self):
            return types.SimpleNamespace(exit=exit)
    with pytest.raises(GuestError, match="could not emulate") as info:
        run_once(Session())
    assert info.value.exit is exit


def _record(seq, vector, rip):
    return LogRecord(seq=seq, vector=vector, cs=0x18, error_code=None, rip=rip, rflags=0x202, tsc=0,
                     cr2=None, rsp=0, cpu=0, fixed_up=False)


def test_where_taken_reads_any_log():
    places = {0x10: Shadow.HELD, 0x20: Shadow.TAKEN_AT_ONCE}

    def seen(log):
        return where_taken(log, MSI_VECTOR, places, Shadow.ELSEWHERE, Shadow.NOT_TAKEN, hex)
    # a vector taken inside the shadow, then #DB after #DB from a trap flag its IRET restored
    stale_trap = seen([_record(0, MSI_VECTOR, 0x20)] + [_record(i, 1, 0x30 + i) for i in range(1, 4)])
    assert stale_trap == Observation(Shadow.TAKEN_AT_ONCE, "taken at 0x20; also logged: #DB (1) x3")
    assert seen([_record(0, MSI_VECTOR, 0x10)]) == Observation(Shadow.HELD, "taken at 0x10")
    assert seen([_record(0, MSI_VECTOR, 0x99)]).outcome == Shadow.ELSEWHERE
    assert seen([]).outcome == Shadow.NOT_TAKEN


def test_docs_table_is_generated_from_the_table():
    assert DOCS.read_text() == doctor.DOCS_HEADER + doctor.markdown_table() + "\n", \
        "docs/host-conformance.md is stale: regenerate it with python -m pykvm.doctor --markdown"


def test_every_probe_has_a_row_and_no_probe_failed(observations):
    assert set(observations) == set(conformance.EXPECTATIONS)
    failed = {k: v.detail for k, v in observations.items() if v.outcome == Result.PROBE_FAILED}
    assert failed == {}


@pytest.mark.parametrize("probe", list(conformance.EXPECTATIONS))
def test_probe_outcome_is_the_one_recorded_for_this_host(observations, probe):
    vendor = facts.detect_vendor()
    row = conformance.EXPECTATIONS[probe]
    observed = observations[probe]
    # kvm_pvm, kvm_amd, kvm_intel: measured outcomes; elsewhere the architectural expectation (unverified).
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
