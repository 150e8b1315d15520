"""One MSI along KVM's path in its trace events (pykvm.interrupt_path), against a control without the MSI.

Where a host emits an event, its fields must name our vector and the events must
come in the order KVM makes them: the MSI, the LAPIC accepting it, the injection
before an entry, that entry, the guest's handler (its TSC placed on the trace
clock), the exit that reports it. kvm_pvm emits no kvm_entry / kvm_inj_virq;
there the test asserts that the timeline says so.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from pykvm import interrupt_path
from pykvm.runtime import trace


@pytest.fixture
def traced(kvm):
    try:
        trace.tracefs_root()
    except trace.TracingUnavailable as exc:
        pytest.skip(str(exc))
    return interrupt_path.trace_interrupt


def test_one_msi_along_the_path(traced):
    path = traced(vector=0x63)
    assert [r.vector for r in path.records] == [0x63]                  # the guest's own log
    [msi] = path.recording.named("kvm:kvm_msi_set_irq")
    assert msi["data"] & 0xFF == 0x63 and msi["address"] >> 20 == 0xFEE
    accepted = path.accepted
    assert accepted is not None and accepted.time >= msi.time
    handler = next(step for step in path.steps if step.source == "guest")
    report = "\n".join(path.report())
    if "kvm:kvm_entry" in path.fired:               # kvm_amd, kvm_intel: the whole path
        injection, entry = path.injection, path.entry_after_injection
        assert injection is not None and entry is not None, report
        assert accepted.time <= injection.time <= entry.time, report
        if path.tsc_offset.consistent:                                # TCG's TSCs drift apart
            start = msi.time - next(step.at for step in path.steps if step.name == "kvm_msi_set_irq")
            margin = 2 * path.tsc_offset.uncertainty_ns / 1e9 + 50e-6
            assert entry.time - start - margin <= handler.at, report     # the handler ran after the entry
    else:                                            # kvm_pvm: the entry side is not traced
        assert {"kvm:kvm_inj_virq", "kvm:kvm_entry"} <= set(path.not_emitted)
        assert "not emitted on this host: " in report
    pio = path.recording.named("kvm:kvm_pio")
    assert pio and pio[-1].time >= accepted.time


def test_control_without_the_msi_shows_none_of_it(traced):
    path = traced(vector=0x63, control=True)
    assert path.records == []
    assert path.recording.count("kvm:kvm_msi_set_irq") == 0
    assert path.accepted is None and path.injection is None
    assert path.recording.count("kvm:kvm_pio") >= 1               # the guest did run its command
    assert trace.leftover_instances() == []


def test_doctor_reports_which_path_events_fire(traced):
    result = subprocess.run([sys.executable, "-m", "pykvm.doctor"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    section = result.stdout[result.stdout.index("== trace events on one MSI's path"):]
    assert "kvm:kvm_msi_set_irq" in section.splitlines()[1]         # emitted on every host
    assert "the guest logged the vector: yes" in section


def test_demo_prints_the_timeline_or_says_what_is_not_emitted(traced):
    result = subprocess.run([sys.executable, "-m", "pykvm.demo", "--path-count", "0"], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    section = result.stdout[result.stdout.index("== 4. one MSI along KVM's path"):result.stdout.index("== summary")]
    assert "kvm_msi_set_irq" in section and "kvm_apic_accept_irq" in section and "guest  handler" in section
    if "kvm_entry: VM entry" in section:           # the note's path, in order, up to the handler's report
        order = [section.index(name) for name in ("kvm_msi_set_irq:", "kvm_apic_accept_irq:", "kvm_inj_virq:",
                                                  "kvm_entry:", "kvm_userspace_exit:")]
        assert order == sorted(order), section
    else:
        assert "not emitted on this host: " in section and "kvm:kvm_entry" in section
