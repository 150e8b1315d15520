"""APF_HALT and APF_READY: asynchronous page faults."""

from __future__ import annotations

from collections.abc import Callable

from .common import Outcome, request

REQUESTS = (
    request(
        "APF_HALT",
        "async page fault that cannot be delivered",
        "vcpu blocks",
        "async PF with userfaultfd",
        "",
        "Halts the vCPU until a page fault handled asynchronously completes.",
        needs="async page faults (kvm_pvm: not offered)",
    ),
    request(
        "APF_READY",
        "async page fault completed",
        "kvm_check_async_pf_completion()",
        "async PF with userfaultfd",
        "",
        "Tells the guest an async page fault is done.",
        needs="async page faults",
    ),
)
SCENARIOS: dict[str, Callable[..., Outcome]] = {}
