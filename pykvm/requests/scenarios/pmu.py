"""PMU and PMI: the virtual performance-monitoring unit, and what is left of them on a host that offers none.

Why this exists: KVM_REQ_PMU makes a vCPU reprogram the host perf events that
back its virtual counters (after a counter's MSR is written, or a new event
filter), and KVM_REQ_PMI delivers the interrupt of a counter that overflowed.
Both need a vPMU, which KVM gives guests only with ``kvm.enable_pmu=Y``; the
scenarios measure that now. Without it KVM_SET_PMU_EVENT_FILTER still raises
KVM_REQ_PMU on every vCPU (the ioctl does not look at the vPMU), with nothing
to reprogram; no counter exists to overflow, so KVM_REQ_PMI cannot be raised.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pykvm
from pykvm import x86
from pykvm.core.constants import Cap

from .common import (
    NO_EFFECT,
    NOT_IMPLEMENTED,
    PORT_READY,
    UNREACHABLE,
    ScenarioRecorder,
    ScenarioResult,
    is_port,
    machine,
    request,
    run_until,
)

ENABLE_PMU = Path("/sys/module/kvm/parameters/enable_pmu")
INSTRUCTIONS_RETIRED = 0xC0           # the event-select code both vendors use for retired instructions
ARCH_PERFMON_LEAF = 0xA


@dataclasses.dataclass(frozen=True)
class Vpmu:
    """What this host's KVM offers guests for performance monitoring, read now."""

    enable_pmu: str                   # the kvm module parameter, "" where the kernel has none
    capability: int                   # KVM_CAP_PMU_CAPABILITY
    perfmon_version: int              # supported CPUID 0xA: EAX[7:0]
    gp_counters: int                  # supported CPUID 0xA: EAX[15:8]

    @property
    def present(self) -> bool:
        return self.enable_pmu != "N" and (self.capability > 0 or self.gp_counters > 0)

    def describe(self) -> str:
        return (f"kvm.enable_pmu={self.enable_pmu or '(no such parameter)'}, KVM_CAP_PMU_CAPABILITY="
                f"{self.capability}, supported CPUID 0xA: version {self.perfmon_version}, "
                f"{self.gp_counters} general-purpose counters")


def vpmu(kvm: pykvm.Kvm) -> Vpmu:
    """Measure now whether ``kvm`` gives guests a vPMU."""
    try:
        enable_pmu = ENABLE_PMU.read_text().strip()
    except OSError:
        enable_pmu = ""
    leaf = next((entry for entry in kvm.supported_cpuid if entry.function == ARCH_PERFMON_LEAF), None)
    eax = leaf.eax if leaf else 0
    return Vpmu(enable_pmu, kvm.check_extension(Cap.PMU_CAPABILITY), eax & 0xFF, (eax >> 8) & 0xFF)


PMU_GUEST = f"""
loop:   out %al, ${PORT_READY:#x}
        jmp loop
"""


def _has_vpmu(t: ScenarioRecorder, found: Vpmu) -> ScenarioResult:
    t.outcome.verdict = NOT_IMPLEMENTED
    t.outcome.why = (f"this host gives guests a vPMU ({found.describe()}); pykvm does not yet program a "
                     "counter to show the request's effect")
    return t.outcome


def pmu(control: bool = False) -> ScenarioResult:
    """KVM_SET_PMU_EVENT_FILTER raises KVM_REQ_PMU on every vCPU: without a vPMU there is nothing to reprogram."""
    t = ScenarioRecorder("PMU", control)
    with machine() as (vm, vcpu):
        found = vpmu(vm.kvm)
        t.outcome.evidence.update(dataclasses.asdict(found), vpmu=found.present)
        if found.present:
            return _has_vpmu(t, found)
        if not vm.kvm.check_extension(Cap.PMU_EVENT_FILTER):
            return t.unreachable("needs KVM_CAP_PMU_EVENT_FILTER: this host has none (checked now)")
        x86.load_code(vcpu, PMU_GUEST)
        run_until(vcpu, t, is_port(PORT_READY))
        with vcpu.stats.delta() as delta:
            if control:
                t.host("nothing (control)")
            else:
                vm.set_pmu_event_filter([INSTRUCTIONS_RETIRED], deny=True)
                t.host(f"KVM_SET_PMU_EVENT_FILTER deny event {INSTRUCTIONS_RETIRED:#x} (retired instructions): "
                       "accepted; KVM raises KVM_REQ_PMU on every vCPU")
            run_until(vcpu, t, is_port(PORT_READY))
        t.stats("vCPU", delta, ("exits", "io_exits"))
        t.add("note", f"no vPMU: {found.describe()}")
        t.outcome.evidence.update(filter_set=not control)
        return t.verdict(False, "", absent_why="no filter set, no request") if control else _no_effect(t, found)


def _no_effect(t: ScenarioRecorder, found: Vpmu) -> ScenarioResult:
    t.outcome.verdict = NO_EFFECT
    t.outcome.why = (f"KVM_SET_PMU_EVENT_FILTER was accepted and raised the request, but this host gives guests "
                     f"no vPMU ({found.describe()}, checked now): kvm_pmu_handle_event() has no counter to "
                     "reprogram, and nothing changes that a guest or userspace can see")
    return t.outcome


def pmi(control: bool = False) -> ScenarioResult:
    """KVM_REQ_PMI needs a virtual counter that overflows: measured now whether the host gives any."""
    t = ScenarioRecorder("PMI", control)
    with pykvm.Kvm() as kvm:
        found = vpmu(kvm)
    t.outcome.evidence.update(dataclasses.asdict(found), vpmu=found.present)
    if found.present:
        return _has_vpmu(t, found)
    return t.unreachable(f"needs a vPMU: this host gives guests none ({found.describe()}, checked now), so no "
                         "virtual counter exists to overflow")


REQUESTS = (
    request(
        "PMU",
        "KVM_SET_PMU_EVENT_FILTER (every vCPU); guest writes of a counter or its event select "
        "(kvm_pmu_request_counter_reprogram); KVM_SET_CPUID2 and vPMU refresh",
        "kvm_pmu_handle_event(): reprogram_counter() for each marked counter",
        "KVM_SET_PMU_EVENT_FILTER denying event 0xc0 while the vCPU runs a loop",
        "with a vPMU, a denied counter stops counting; here: the ioctl accepted, and no vPMU (kvm.enable_pmu, "
        "KVM_CAP_PMU_CAPABILITY, CPUID 0xA read now)",
        "A guest's performance counters are host perf events that KVM creates for it. When what they count "
        "must change (the guest wrote an event-select or counter MSR, or userspace installed an event filter "
        "with KVM_SET_PMU_EVENT_FILTER) KVM marks the counters and raises KVM_REQ_PMU; before the next entry "
        "kvm_pmu_handle_event() releases and recreates each marked perf event, now subject to the filter. "
        "The filter ioctl raises the request on every vCPU whether or not they have counters, so on a host "
        "without a vPMU the request is handled with nothing to do.",
        pvm=NO_EFFECT,
        amd=NO_EFFECT,
        needs="a vPMU",
        intel=NO_EFFECT,
    ),
    request(
        "PMI",
        "kvm_pmu_deliver_pmi() callers: a vPMU counter overflow (kvm_perf_overflow, kvm_pmu_incr_counter)",
        "kvm_pmu_deliver_pmi(): the LAPIC's LVTPC interrupt",
        "a guest counter programmed to overflow (needs a vPMU)",
        "the LVTPC vector in the guest; here: no vPMU (kvm.enable_pmu, KVM_CAP_PMU_CAPABILITY, CPUID 0xA)",
        "When a virtual counter overflows, the host perf event's overflow callback runs in NMI or interrupt "
        "context on the host; it records the overflow and raises KVM_REQ_PMI, and the vCPU's own thread then "
        "delivers the performance-monitoring interrupt through the guest's LAPIC LVTPC entry before it "
        "enters. Without a vPMU no counter exists, so the request cannot be raised.",
        pvm=UNREACHABLE,
        amd=UNREACHABLE,
        needs="a vPMU",
        intel=UNREACHABLE,
    ),
)
SCENARIOS: dict[str, Callable[..., ScenarioResult]] = {"PMU": pmu, "PMI": pmi}
