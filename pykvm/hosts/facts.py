"""What pykvm knows about this machine's KVM: named facts, measured here by their probes.

Why this exists: code and tests must detect the host, never assume it. Each
known difference is a named :class:`Behaviour` (``host.sends_irq_window_exits``
...): the outcome of the probe that defines it (a row of
:mod:`pykvm.hosts.conformance` names its fact), whether that is what the
architecture calls for, and how it is known. :func:`detect` gives this host's
facts as its probes measured them (:mod:`pykvm.hosts.measurement`: once per
kernel, vendor module and module parameters, then cached), so a host in a
configuration no one recorded is described by what it does; where a measured
outcome departs from pykvm's record for the vendor module, the fact follows the
measurement and says so. :func:`host_info` gives a vendor module's facts as
pykvm recorded them, which is documentation of what was measured where.

Facts that depend on the CPU mode have one name per mode: the long-mode name
(``nmi_blocked_until_iret``) and the others with the mode added
(``nmi_blocked_until_iret_real``); :meth:`HostInfo.in_mode` picks one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..core.errors import InvalidArgument
from . import measurement
from .conformance import EXPECTATIONS
from .probes.base import Expectation, Observation, ProbeOutcome, Result, in_mode
from .vendor import VendorModule, detect_vendor

if TYPE_CHECKING:
    from ..core.system import Kvm


@dataclasses.dataclass(frozen=True)
class Behaviour:
    """One fact about a host: whether it ``holds`` (the probe gave the architectural outcome), and why.

    ``outcome`` is what the probe gave on this host (or, where it was not
    measured, the record's); ``recorded`` what pykvm's table holds for the
    vendor module; ``verified`` is False where neither was measured.
    """

    holds: bool
    reason: str
    verified: bool
    probe: str
    outcome: ProbeOutcome
    recorded: ProbeOutcome

    def __bool__(self) -> bool:
        return self.holds

    @property
    def differs_from_record(self) -> bool:
        return self.outcome != self.recorded


@dataclasses.dataclass(frozen=True)
class HostInfo:
    """What pykvm knows about the KVM on this machine."""

    vendor: VendorModule
    sends_irq_window_exits: Behaviour
    sends_irq_window_exits_real: Behaviour
    sends_irq_window_exits_protected: Behaviour
    interrupt_held_while_not_ready: Behaviour
    interrupt_held_while_not_ready_real: Behaviour
    interrupt_held_while_not_ready_protected: Behaviour
    io_exit_rip_at_out: Behaviour
    long_mode_interrupt_shadow: Behaviour
    protected_mode_iret: Behaviour
    software_interrupts: Behaviour
    real_mode_ud2: Behaviour
    nmi_blocked_until_iret: Behaviour
    nmi_blocked_until_iret_real: Behaviour
    nmi_blocked_until_iret_protected: Behaviour
    nmi_delivered_at_iret: Behaviour
    nmi_delivered_at_iret_real: Behaviour
    nmi_delivered_at_iret_protected: Behaviour
    lapic_tracks_in_service: Behaviour
    lapic_delivers_when_unblocked: Behaviour
    single_step_stops_in_sti_shadow: Behaviour
    single_step_stops_in_sti_shadow_real: Behaviour
    single_step_stops_in_sti_shadow_protected: Behaviour

    @property
    def name(self) -> str:
        return self.vendor.value

    def facts(self) -> dict[str, Behaviour]:
        """Every fact by name, in the table's order."""
        return {row.fact: getattr(self, row.fact) for row in EXPECTATIONS.values() if row.fact is not None}

    def in_mode(self, fact: str, mode: str) -> Behaviour:
        """Fact ``fact`` (its long-mode name) in CPU ``mode``: ``host.in_mode("nmi_blocked_until_iret", "real")``."""
        name = in_mode(fact, mode)
        if name not in self.facts():
            raise InvalidArgument(f"{name!r} is no host fact: a fact measured per mode is one of "
                                 f"{', '.join(sorted(f for f in self.facts() if in_mode(f, 'real') in self.facts()))}; "
                                  f"other facts have one name: read the attribute")
        return getattr(self, name)

    def differences(self) -> list[str]:
        """Plain-words list of where this host departs from the architecture / VT-x."""
        return [f"{row.title}: {row.explain(fact.outcome)} ({fact.reason})"
                for row in EXPECTATIONS.values() if row.fact is not None
                for fact in [getattr(self, row.fact)] if fact.outcome != row.expected]

    def departures_from_record(self) -> dict[str, Behaviour]:
        """The facts whose measured outcome is not the one pykvm recorded for this vendor module."""
        return {name: fact for name, fact in self.facts().items() if fact.differs_from_record}


def _recorded(row: Expectation, vendor: VendorModule) -> Behaviour:
    known = row.known(vendor)
    return Behaviour(known.outcome == row.expected, known.source, known.verified, row.probe, known.outcome,
                     known.outcome)


def _measured(row: Expectation, vendor: VendorModule, seen: Observation | None) -> Behaviour:
    """The fact from its probe's observation here; the record where the probe could not measure it."""
    known = row.known(vendor)
    if seen is None or seen.outcome is None or seen.outcome == Result.PROBE_FAILED:
        why = "not measured" if seen is None else ("unsupported" if seen.outcome is None else "probe failed")
        return dataclasses.replace(_recorded(row, vendor), verified=False,
                                   reason=f"{row.probe} {why} on this host ({seen.detail if seen else 'no run'}); "
                                          f"pykvm's record for {vendor.value}: {known.source}")
    unlike = "" if seen.outcome == known.outcome else (
        f"; pykvm's record for {vendor.value} has '{known.outcome}'")
    return Behaviour(seen.outcome == row.expected, f"{row.probe} measured '{seen.outcome}' on this host{unlike}",
                     True, row.probe, seen.outcome, known.outcome)


def host_info(vendor: VendorModule) -> HostInfo:
    """The facts pykvm recorded for ``vendor`` (the conformance table's column)."""
    return HostInfo(vendor, **{row.fact: _recorded(row, vendor)
                               for row in EXPECTATIONS.values() if row.fact is not None})


def measured_info(vendor: VendorModule, observations: Mapping[str, Observation]) -> HostInfo:
    """The facts of a ``vendor`` host whose probes gave ``observations``."""
    return HostInfo(vendor, **{row.fact: _measured(row, vendor, observations.get(row.probe))
                               for row in EXPECTATIONS.values() if row.fact is not None})


_detected: HostInfo | None = None


def detect(kvm: Kvm | None = None) -> HostInfo:
    """This machine's facts, as its probes measured them with ``kvm`` (default: a ``/dev/kvm`` of its own).

    Measured once per process, and on disk once per key (:mod:`pykvm.hosts.measurement`).
    While the probes run, code they call may ask for the facts themselves: that
    call gets the record, since the measurement is not there yet.
    """
    global _detected
    if measurement.in_progress():
        return host_info(detect_vendor())
    if _detected is None:
        from ..core.system import Kvm
        if kvm is None:
            with Kvm() as own:
                observations = measurement.load(own)
        else:
            observations = measurement.load(kvm)
        _detected = measured_info(detect_vendor(), observations)
    return _detected
