"""``python -m pykvm.doctor``, its probes, the conformance table and the cache of measured facts.

The hardware tests run every probe on this host. Where the host runs the
configuration pykvm's table records for its vendor module (kvm_pvm, kvm_amd
under QEMU TCG, kvm_intel under Bochs with the recorded parameters), each
outcome must be the recorded one: the table documents what was measured where.
Elsewhere the outcomes are measurements the doctor reports; the host facts the
other tests branch on follow them (pykvm.hosts.measurement). A test sabotages
that cache on every host: the suite's loader and the doctor must both notice.
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
from pykvm.hosts import conformance, facts, measurement, probes
from pykvm.hosts.probes import Observation, ProbeOutcome, Result, Scenario
from pykvm.hosts.probes.exits import IrqWindow
from pykvm.hosts.probes.harness import MSI_VECTOR, run_once, where_taken
from pykvm.hosts.probes.nmi import NmiBlocking, NmiWindow, held_nmi_outcome
from pykvm.hosts.probes.shadows import Shadow
from pykvm.hosts.vendor import VendorModule

DOCS = Path(__file__).resolve().parent.parent / "docs" / "host-conformance.md"
# The probes run per CPU mode whose real- and protected-mode rows came after kvm_amd's measurement.
PER_MODE = ("irq_window", "interrupt_not_ready", "nmi_blocking", "nmi_window", "step_sti_shadow")


@pytest.fixture(scope="module")
def observations(kvm_available):
    import pykvm
    with pykvm.Kvm() as kvm:
        return probes.run_probes(kvm)


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """The cache of measured facts in a directory of the test's own (the doctor writes there)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path


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
    assert len(rows) == len(conformance.EXPECTATIONS)
    for row in rows:
        family = type(row.expected)
        assert issubclass(family, ProbeOutcome) and family is not ProbeOutcome, row.probe
        assert all(isinstance(outcome, family) for outcome in row.explanations), row.probe
        # a record may also be KVM_EXIT_INTERNAL_ERROR, evidence about the host (kvm_pvm's protected-mode IRET)
        assert all(isinstance(known.outcome, family) or known.outcome == Result.INTERNAL_ERROR
                   for known in row.hosts.values()), row.probe
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


def test_a_held_nmi_is_placed_by_where_it_was_taken_and_by_kvms_exit_counts():
    returned_to, later = 0x1006d, 0x10068
    # taken at the IRET's return point: the window KVM asked for (an NMI-window exit), or virtual NMIs (none)
    assert held_nmi_outcome(returned_to, returned_to, False, 1, 0) == NmiWindow.AFTER_IRET
    assert held_nmi_outcome(returned_to, returned_to, False, 0, 0) == NmiWindow.AFTER_IRET
    # taken later before the guest's next exit (ci19, kvm_pvm: at the entry after a preemption), or after it
    assert held_nmi_outcome(returned_to, later, False, 0, 1) == NmiWindow.NEXT_ENTRY
    assert held_nmi_outcome(returned_to, None, False, 0, 0) == NmiWindow.NEXT_ENTRY
    # at the return point, but an exit handled in the kernel came and no window exit: either host could do it
    assert held_nmi_outcome(returned_to, returned_to, False, 0, 1) is None
    # the control: the same exit beside an NMI-window exit is the window's
    assert held_nmi_outcome(returned_to, returned_to, False, 1, 1) == NmiWindow.AFTER_IRET
    assert held_nmi_outcome(returned_to, 0x10200, True, 0, 0) == NmiWindow.NOT_HELD


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
    observed, known = observations[probe], row.known(vendor)
    assert observed.outcome != Result.PROBE_FAILED, observed.detail
    if known.verified and conformance.runs_as_recorded(vendor, measurement.module_parameters()):
        # kvm_pvm, kvm_amd, kvm_intel in the configuration measured for the table.
        assert observed.outcome == known.outcome, f"{probe} on {vendor.value}: {observed.detail} ({known.source})"


def test_doctor_prints_identity_capabilities_and_probes(private_cache, kvm_available, capsys):
    assert doctor.main([]) == 0
    out = capsys.readouterr().out
    for section in ("== host", "== capabilities", "== probes", "== cache of measured facts", "== summary"):
        assert section in out
    key = measurement.host_key()
    assert f"vendor module   {key.module}" in out and f"parameters      {key.describe_parameters()}" in out
    assert f"== probes under {key.describe_parameters()}" in out
    assert "KVM_CAP_IRQCHIP" in out and "0 probe failed" in out
    assert "written from this run (no earlier measurement for this key)" in out
    assert measurement.cache_path(key).is_file()


def test_doctor_json(private_cache, kvm_available, capsys):
    assert doctor.main(["--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["host"]["vendor"] == facts.detect_vendor().value and data["host"]["api_version"] == 12
    assert {p["probe"] for p in data["probes"]} == set(conformance.EXPECTATIONS)
    assert all(p["verdict"] in ("conforms", "differs", "unsupported") for p in data["probes"])
    assert data["cache"]["path"] == str(measurement.cache_path(measurement.host_key()))
    assert data["cache"]["contradictions"] == {} and data["cache"]["tampered"] == {}


def _verdicts(vendor, observed):
    return [conformance.judge(probe, observed.get(probe, conformance.EXPECTATIONS[probe].known(vendor).outcome),
                              "seen", vendor) for probe in conformance.EXPECTATIONS]


def test_doctor_names_each_difference_from_the_record_and_each_cache_problem(tmp_path):
    intel = VendorModule.INTEL
    identity = doctor.Identity(intel.value, "6.12", 12, "cpu", True, "/dev/kvm", "kvm_intel: ept=N")
    caps = [{"capability": "KVM_CAP_IRQCHIP", "value": 1, "gates": "x"}]
    cache = measurement.CacheCheck(tmp_path / "f.json", "", {"irq_window": ("exit after sti; nop", "no window exit")},
                                   {"lapic_isr": "holds 'x', but its seal does not match"}, "")
    text = doctor.report(identity, caps, _verdicts(intel, {"nmi_blocking_real": NmiBlocking.NESTED}), cache)
    assert "differs from the record for kvm_intel: nmi_blocking_real (the host facts follow" in text
    assert "differs from the record (held until IRET)" in text and "== probes under kvm_intel: ept=N" in text
    assert ("irq_window: the cached fact contradicts this run: cached 'exit after sti; nop', measured now "
            "'no window exit'") in text
    assert "lapic_isr: the cached entry cannot be used: holds 'x'" in text and "--refresh" in text
    clean = doctor.report(identity, caps, _verdicts(intel, {}), dataclasses.replace(cache, contradictions={},
                                                                                     tampered={}))
    assert "differs from the record for kvm_intel: none" in clean and "every cached fact is as measured now" in clean


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


def _rewrite(path, probe, **fields):
    data = json.loads(path.read_text())
    data["entries"][probe].update(fields)
    path.write_text(json.dumps(data))


def test_a_sabotaged_cache_is_noticed_by_the_suite_and_the_doctor(private_cache, kvm, monkeypatch, capsys):
    """A wrong fact in the cache: the loader refuses it by name; resealed, the doctor's fresh run exposes it.

    Every probe runs once, here; the doctor's runs reuse that measurement (and skip the MSI trace), which
    keeps the test to one measurement under an emulated host.
    """
    fresh = measurement.run(kvm)
    monkeypatch.setattr(measurement, "run", lambda kvm, scenarios=None: fresh)
    monkeypatch.setattr(doctor, "traced_path", lambda: {"recorded": False, "why": "not this test's subject"})
    assert doctor.main([]) == 0                                 # no cache yet: the doctor writes it
    assert "written from this run (no earlier measurement for this key)" in capsys.readouterr().out
    key, probe = measurement.host_key(), "nmi_blocking_real"
    measured, path = fresh[probe], measurement.cache_path(key)
    wrong = next(outcome for outcome in NmiBlocking if outcome != measured.outcome)
    _rewrite(path, probe, outcome=str(wrong))
    # The suite's loader (the host fixture's, facts.detect) refuses the entry, naming it and the fix.
    monkeypatch.setattr(facts, "_detected", None)
    with pytest.raises(measurement.HostFactsCacheError, match=rf"{probe}: holds '{wrong}', but its seal does not "
                                                              rf"match.*python -m pykvm.doctor --refresh"):
        facts.detect(kvm)
    # The doctor names it too, and fails; it leaves the file for the user to see.
    assert doctor.main([]) == 1
    assert f"{probe}: the cached entry cannot be used: holds '{wrong}'" in capsys.readouterr().out
    # A forgery with a valid seal passes the loader's checks; the doctor's fresh measurement contradicts it.
    _rewrite(path, probe, seal=measurement.seal(key, probe, str(wrong), measured.detail), detail=measured.detail)
    assert measurement.load(kvm, key)[probe].outcome == wrong
    assert doctor.main([]) == 0
    out = capsys.readouterr().out
    assert (f"{probe}: the cached fact contradicts this run: cached '{wrong}', measured now '{measured.outcome}'"
            in out and "cached facts: NOT as measured now" in out)
    # --refresh rewrites the cache from the fresh run.
    assert doctor.main(["--refresh"]) == 0
    assert "written from this run (--refresh)" in capsys.readouterr().out
    assert measurement.load(kvm, key)[probe].outcome == measured.outcome


def test_a_cache_file_of_another_key_is_measured_again(private_cache, kvm):
    """A file for another kernel, module, parameters or probe code (copied from elsewhere) is stale: re-measured."""
    key = measurement.host_key()
    elsewhere = dataclasses.replace(key, parameters={**key.parameters, "kvm_intel.ept": "N"})
    wrong = Observation(next(outcome for outcome in NmiBlocking), "measured elsewhere")
    copied = measurement.store(elsewhere, {"nmi_blocking_real": wrong})
    measurement.cache_path(key).write_bytes(copied.read_bytes())
    measured = measurement.load(kvm, key, ["nmi_blocking_real"])["nmi_blocking_real"]
    assert measured.detail != "measured elsewhere" and measured.outcome in set(NmiBlocking)
    assert measurement.read(key).observations["nmi_blocking_real"] == measured
