"""The Hyper-V requests: crash and reset MSRs, SynIC exits, synthetic timers."""

from __future__ import annotations

from collections.abc import Callable

from .common import Outcome, request

REQUESTS = (
    request(
        "HV_CRASH",
        "Hyper-V crash MSRs",
        "KVM_EXIT_SYSTEM_EVENT crash",
        "Hyper-V enlightenments",
        "",
        "Reports a Hyper-V guest crash.",
        needs="Hyper-V emulation",
    ),
    request(
        "HV_RESET",
        "Hyper-V reset MSR",
        "KVM_EXIT_SYSTEM_EVENT reset",
        "Hyper-V enlightenments",
        "",
        "Resets a Hyper-V guest.",
        needs="Hyper-V emulation",
    ),
    request(
        "HV_EXIT",
        "Hyper-V SynIC / hypercalls",
        "KVM_EXIT_HYPERV",
        "Hyper-V enlightenments",
        "",
        "Exits to userspace for Hyper-V SynIC events.",
        needs="Hyper-V emulation",
    ),
    request(
        "HV_STIMER",
        "Hyper-V synthetic timers",
        "kvm_hv_process_stimers()",
        "Hyper-V enlightenments",
        "",
        "Processes expired Hyper-V synthetic timers.",
        needs="Hyper-V emulation",
    ),
)
SCENARIOS: dict[str, Callable[..., Outcome]] = {}
