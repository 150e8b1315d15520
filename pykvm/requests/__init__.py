"""KVM's requests (``KVM_REQ_*``): what raises each one, what handles it, and what pykvm measured here.

Why this exists: before every guest entry KVM's ``vcpu_enter_guest()`` checks
a set of per-vCPU request bits that other code raised (an ioctl, a timer, an
MMU notifier, another vCPU). This table names each request, where it is made
and handled (kernel 6.12 sources), how pykvm raises it and what evidence shows
it was handled; :mod:`pykvm.requests.scenarios` runs the scenarios. The
``expected`` column holds what was measured on kvm_pvm, kvm_amd and kvm_intel; verdicts
printed by ``python -m pykvm.requests`` are measured in that run, and the tests
compare the two.
"""

from __future__ import annotations

import dataclasses

from ..hosts.vendor import VendorModule, detect_vendor
from .scenarios import NO_EFFECT, NOT_IMPLEMENTED, OBSERVED, ROWS, SCENARIOS, UNREACHABLE, Request, ScenarioResult
from .scenarios.mmu import two_dimensional_paging

# The order vcpu_enter_guest() checks the requests in (Linux 6.12), as the table lists them.
ORDER = ("VM_DEAD", "GET_NESTED_STATE_PAGES", "MMU_FREE_OBSOLETE_ROOTS", "MIGRATE_TIMER", "MASTERCLOCK_UPDATE",
         "GLOBAL_CLOCK_UPDATE", "CLOCK_UPDATE", "MMU_SYNC", "LOAD_MMU_PGD", "TLB_FLUSH", "TLB_FLUSH_CURRENT",
         "REPORT_TPR_ACCESS", "TRIPLE_FAULT", "APF_HALT", "STEAL_UPDATE", "SMI", "NMI", "PMU", "PMI",
         "IOAPIC_EOI_EXIT", "SCAN_IOAPIC", "LOAD_EOI_EXITMAP", "APIC_PAGE_RELOAD", "HV_CRASH", "HV_RESET",
         "HV_EXIT", "HV_STIMER", "APICV_UPDATE", "APF_READY", "MSR_FILTER_CHANGED", "UPDATE_CPU_DIRTY_LOGGING",
         "EVENT")
assert sorted(ORDER) == sorted(ROWS), "every request has one row in one scenario group"
REQUESTS: tuple[Request, ...] = tuple(ROWS[name] for name in ORDER)
BY_NAME = {request.name: request for request in REQUESTS}


@dataclasses.dataclass
class Row:
    """One request on this host: its verdict (measured when pykvm has a scenario) and why."""

    request: Request
    verdict: str
    why: str
    outcome: ScenarioResult | None = None

    def as_dict(self) -> dict:
        r = self.request
        return {"name": r.name, "made_in": r.made_in, "handled_in": r.handled_in, "trigger": r.trigger,
                "evidence": r.evidence, "verdict": self.verdict, "why": self.why,
                "outcome": self.outcome.as_dict() if self.outcome else None}


def expected(request: Request, vendor: VendorModule | None = None) -> str:
    """What was measured for ``request`` on ``vendor`` before (the table), NOT_IMPLEMENTED when unknown.

    For kvm_amd without NPT (``npt=0``, read now) the row's ``amd_shadow`` verdict, where it has one.
    """
    vendor = detect_vendor() if vendor is None else vendor
    if vendor == VendorModule.AMD and request.amd_shadow and not two_dimensional_paging():
        return request.amd_shadow
    return request.expected.get(vendor, NOT_IMPLEMENTED)


def run_request(request: Request, vendor: VendorModule | None = None) -> Row:
    """Measure ``request`` here: run its scenario, or say why there is none."""
    vendor = detect_vendor() if vendor is None else vendor
    scenario = SCENARIOS.get(request.name)
    if scenario is not None:
        outcome = scenario()
        return Row(request, outcome.verdict, outcome.why, outcome)
    needs = f" (needs {request.needs})" if request.needs else ""
    return Row(request, NOT_IMPLEMENTED, f"pykvm has no scenario for it yet{needs}")


__all__ = ["REQUESTS", "BY_NAME", "Request", "Row", "run_request", "expected",
           "OBSERVED", "NO_EFFECT", "UNREACHABLE", "NOT_IMPLEMENTED"]
