"""What each host is expected to do: the one table behind the doctor, the host facts and the tests.

Why this exists: "what does this host do" must be defined once. Each row
names a probe, the outcome the architecture or KVM's documentation calls for,
where that comes from, and what pykvm has measured (or, for VT-x, expects) on
each vendor module. The rows are written beside the scenarios that measure
them, one module per probe family in :mod:`pykvm.hosts.probes`; this module
gathers them into :data:`EXPECTATIONS` and judges live observations against it.
``python -m pykvm.doctor`` compares a live run against it;
:mod:`pykvm.hosts.facts` derives its facts (``host.sends_irq_window_exits``
...) from it, and the tests branch on those.

Importing the probe families imports :mod:`pykvm.guests`, a lower layer that
never imports this one, so the table makes no import cycle.
"""

from __future__ import annotations

import dataclasses

from .probes import SCENARIOS
from .probes.base import Expectation, Known, ProbeOutcome, Result
from .vendor import VendorModule

__all__ = ["EXPECTATIONS", "RECORDED_PARAMETERS", "Expectation", "Known", "ProbeOutcome", "Result", "Verdict", "judge",
           "runs_as_recorded"]

EXPECTATIONS: dict[str, Expectation] = {row.probe: row for scenario in SCENARIOS for row in scenario.rows}

# The module parameters that change KVM's paths, as they were where each column of the table was
# measured (the rest were the module's defaults). A host with other values runs a configuration the
# record does not cover: its probes' outcomes are measurements to report, not regressions.
RECORDED_PARAMETERS: dict[VendorModule, dict[str, str]] = {
    VendorModule.INTEL: {"kvm_intel.enable_apicv": "N", "kvm_intel.ept": "Y", "kvm_intel.unrestricted_guest": "Y"},
}


def runs_as_recorded(vendor: VendorModule, parameters: dict[str, str]) -> bool:
    """Whether a ``vendor`` host with module ``parameters`` runs the configuration its column was measured in."""
    return all(parameters.get(name) == value for name, value in RECORDED_PARAMETERS.get(vendor, {}).items())


@dataclasses.dataclass(frozen=True)
class Verdict:
    """One probe's live result against the table."""

    probe: str
    title: str
    expected: ProbeOutcome
    observed: ProbeOutcome | None
    verdict: str             # conforms / differs / unsupported / probe failed
    explanation: str
    recorded: ProbeOutcome        # what the table holds for this host
    matches_record: bool
    detail: str = ""         # what the probe saw


def judge(probe: str, observed: ProbeOutcome | None, detail: str, vendor: VendorModule) -> Verdict:
    """Compare one observation with the architectural expectation and with pykvm's record."""
    row = EXPECTATIONS[probe]
    known = row.known(vendor)
    if observed is None:
        verdict, explanation = "unsupported", detail
    elif observed == Result.PROBE_FAILED:
        verdict, explanation = "probe failed", detail
    elif observed == row.expected:
        verdict, explanation = "conforms", ""
    else:
        verdict, explanation = "differs", row.explain(observed)
    return Verdict(probe, row.title, row.expected, observed, verdict, explanation, known.outcome,
                   observed == known.outcome, detail)
