"""What pykvm knows about this machine's KVM: named facts derived from the conformance table.

Why this exists: code and tests must detect the host, never assume it. Each
known difference is a named :class:`Behaviour` (``host.sends_irq_window_exits``
...) with its source and whether it was measured; tests branch on these to
assert the host's measured behaviour. The facts come from
:mod:`pykvm.hosts.conformance`, so each is stated once.
"""

from __future__ import annotations

import dataclasses
import functools

from .conformance import EXPECTATIONS
from .vendor import VendorModule, detect_vendor


@dataclasses.dataclass(frozen=True)
class Behaviour:
    """One interrupt-semantics fact about a host; ``verified`` is False for expectations."""

    holds: bool
    reason: str
    verified: bool

    def __bool__(self) -> bool:
        return self.holds


@dataclasses.dataclass(frozen=True)
class HostInfo:
    """What pykvm knows about the KVM on this machine."""

    vendor: VendorModule
    sends_irq_window_exits: Behaviour
    io_exit_rip_at_out: Behaviour
    long_mode_interrupt_shadow: Behaviour
    protected_mode_iret: Behaviour
    software_interrupts: Behaviour
    real_mode_ud2: Behaviour
    nmi_delivered_at_iret: Behaviour
    lapic_tracks_in_service: Behaviour
    lapic_delivers_when_unblocked: Behaviour
    single_step_stops_in_sti_shadow: Behaviour

    @property
    def name(self) -> str:
        return self.vendor.value

    def differences(self) -> list[str]:
        """Plain-words list of where this host departs from the architecture / VT-x."""
        return [f"{row.title}: {row.explain(known.outcome)} ({known.source})"
                for row in EXPECTATIONS.values() if row.fact is not None
                for known in [row.known(self.vendor)] if known.outcome != row.expected]

def _facts(vendor: VendorModule) -> dict[str, Behaviour]:
    """Each HostInfo fact, derived from its row of the conformance table (pykvm.hosts.conformance)."""
    facts = {}
    for row in EXPECTATIONS.values():
        if row.fact is not None:
            known = row.known(vendor)
            facts[row.fact] = Behaviour(known.outcome == row.expected, known.source, known.verified)
    return facts


def host_info(vendor: VendorModule) -> HostInfo:
    """The facts pykvm holds for ``vendor``."""
    return HostInfo(vendor, **_facts(vendor))


@functools.cache
def detect() -> HostInfo:
    """The facts for this machine's KVM (cached)."""
    return host_info(detect_vendor())
