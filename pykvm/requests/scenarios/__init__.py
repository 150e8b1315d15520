"""One scenario per KVM_REQ_* request pykvm can raise, grouped by subsystem, one module per group.

Each group module (``events``, ``clock``, ``mmu``, ...) holds its requests'
table rows (``REQUESTS``) and the scenarios that raise them (``SCENARIOS``:
name to a function ``scenario(control=False) -> ScenarioResult``), with each
scenario's guest beside it. This package gathers them; a new group module is
picked up by being listed in ``GROUPS``.
"""

from __future__ import annotations

from collections.abc import Callable

from . import apf, apic, clock, events, hyperv, mmu, msr, nested, pmu, smm
from .common import (
    DATA,
    NO_EFFECT,
    NOT_IMPLEMENTED,
    OBSERVED,
    UNREACHABLE,
    Request,
    ScenarioRecorder,
    ScenarioResult,
    Step,
)

GROUPS = (events, msr, clock, mmu, apic, smm, nested, apf, hyperv, pmu)

ROWS: dict[str, Request] = {}
SCENARIOS: dict[str, Callable[..., ScenarioResult]] = {}
for _group in GROUPS:
    for _row in _group.REQUESTS:
        assert _row.name not in ROWS, f"KVM_REQ_{_row.name} is in two groups"
        ROWS[_row.name] = _row
    SCENARIOS.update(_group.SCENARIOS)

__all__ = [
    "DATA",
    "GROUPS",
    "NO_EFFECT",
    "NOT_IMPLEMENTED",
    "OBSERVED",
    "ROWS",
    "SCENARIOS",
    "UNREACHABLE",
    "Request",
    "ScenarioRecorder",
    "ScenarioResult",
    "Step",
]
