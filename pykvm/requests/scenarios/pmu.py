"""PMU and PMI: the virtual performance-monitoring unit."""

from __future__ import annotations

from collections.abc import Callable

from .common import Outcome, request

REQUESTS = (
    request(
        "PMU",
        "vPMU counter overflow / reprogramming",
        "kvm_pmu_handle_event()",
        "guest programs a PMU counter",
        "",
        "Reprograms the perf events backing the vPMU.",
        needs="a vPMU",
    ),
    request(
        "PMI",
        "vPMU counter overflow",
        "kvm_pmu_deliver_pmi()",
        "counter overflow",
        "",
        "Delivers the performance-monitoring interrupt.",
        needs="a vPMU",
    ),
)
SCENARIOS: dict[str, Callable[..., Outcome]] = {}
