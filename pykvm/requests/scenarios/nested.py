"""GET_NESTED_STATE_PAGES: a nested guest restored by KVM_SET_NESTED_STATE."""

from __future__ import annotations

from collections.abc import Callable

from .common import Outcome, request

REQUESTS = (
    request(
        "GET_NESTED_STATE_PAGES",
        "nested VM entry / KVM_SET_NESTED_STATE",
        "get_nested_state_pages()",
        "nested guest",
        "",
        "Maps the L1 pages nested state refers to.",
        needs="nested virtualization",
    ),
)
SCENARIOS: dict[str, Callable[..., Outcome]] = {}
