"""What a probe is made of: its outcomes, its row of the conformance table, and its scenario.

Why this exists: a probe's expected outcome and the guest code that measures
it must use the same words, or a typo shows only as "NOT as recorded" on a live
host. Each probe family (a module of :mod:`pykvm.hosts.probes`) names its
outcomes once, as an :class:`ProbeOutcome` enum, and uses those names in its rows
(:class:`Expectation`) and in its scenarios, which sit beside the rows.
:func:`scenario` registers a scenario with the rows it reports;
:mod:`pykvm.hosts.conformance` builds the table from them.

This module imports nothing that runs guests, so the table stays light to build.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable

from ...core.errors import InvalidArgument
from ..vendor import VendorModule

PVM_MEASURED = "measured on kvm_pvm by python -m pykvm.doctor (Linux 6.18, nested under KVM)"
AMD_MEASURED = ("measured on kvm_amd (Debian Linux 6.12.117, under QEMU TCG -cpu max) by "
                "python -m pykvm.hosts tcg-amd -- python -m pykvm.doctor")
INTEL_MEASURED = ("measured on kvm_intel (Debian Linux 6.12.117, enable_apicv=0) under Bochs 3.0's "
                  "emulated VMX by python -m pykvm.hosts bochs-intel -- python -m pykvm.doctor")
UNMEASURED = "architectural expectation, not measured on this vendor module"


class ProbeOutcome(str, enum.Enum):
    """A probe's outcome: a named phrase (the phrase is what the doctor prints and compares)."""

    def __str__(self) -> str:
        return self.value


class Result(ProbeOutcome):
    """Outcomes the runner gives any probe whose scenario did not finish."""

    PROBE_FAILED = "probe failed"                 # pykvm's scenario broke: a bug to fix
    INTERNAL_ERROR = "KVM internal error"         # KVM stopped the guest: evidence about the host


RESULT_EXPLANATIONS: dict[ProbeOutcome, str] = {
    Result.INTERNAL_ERROR: "KVM ended the scenario with KVM_EXIT_INTERNAL_ERROR: it could not run or emulate "
                           "the guest's code there (the exit is in what was seen)",
}


@dataclasses.dataclass(frozen=True)
class Observation:
    """What one probe saw: ``outcome`` (None: the host lacks what it needs) and ``detail``."""

    outcome: ProbeOutcome | None
    detail: str


@dataclasses.dataclass(frozen=True)
class Known:
    """What pykvm recorded for one vendor module: the outcome, and how it is known."""

    outcome: ProbeOutcome
    source: str
    verified: bool


@dataclasses.dataclass(frozen=True)
class Expectation:
    """One probe: the architectural / documented outcome, its source, and what each host does."""

    probe: str
    title: str
    expected: ProbeOutcome
    source: str
    hosts: dict[VendorModule, Known]
    explanations: dict[ProbeOutcome, str] = dataclasses.field(default_factory=dict)
    fact: str | None = None        # the HostInfo attribute this row defines

    def known(self, vendor: VendorModule) -> Known:
        """The recorded outcome for ``vendor``; the expectation itself (unverified) when none is recorded."""
        if vendor in self.hosts:
            return self.hosts[vendor]
        return Known(self.expected, UNMEASURED, False)

    def explain(self, outcome: ProbeOutcome) -> str:
        return self.explanations.get(outcome) or RESULT_EXPLANATIONS.get(
            outcome, f"observed '{outcome}', expected '{self.expected}'")


def measured(pvm: ProbeOutcome, amd: ProbeOutcome, intel: ProbeOutcome, pvm_note: str = "", intel_note: str = "",
             amd_note: str = "") -> dict[VendorModule, Known]:
    """A row's ``hosts``: what kvm_pvm, kvm_amd and kvm_intel did, each measured by the doctor.

    A note says what else the measurement showed, such as where the emulator
    under the host, not KVM, decided the outcome, or on which kernel a row
    added later was measured (:func:`mode_note`).
    """
    def source(measurement: str, note: str) -> str:
        return measurement + (f"; {note}" if note else "")
    return {VendorModule.PVM: Known(pvm, source(PVM_MEASURED, pvm_note), True),
            VendorModule.AMD: Known(amd, source(AMD_MEASURED, amd_note), True),
            VendorModule.INTEL: Known(intel, source(INTEL_MEASURED, intel_note), True)}


# The CPU modes the guest images run in. KVM may take another path per mode (kvm_intel without
# unrestricted guest runs real mode in vm86 and injects there through its instruction emulator),
# so a probe of injection, NMI blocking or the shadows runs in each; its long-mode row keeps the
# probe's plain name, the others add the mode: nmi_blocking, nmi_blocking_real, nmi_blocking_protected.
MODES = ("real", "protected", "long")


def mode_note(mode: str, note: str = "") -> str:
    """kvm_intel's or kvm_amd's note on a row of ``mode``: their real- and protected-mode rows came later, on a
    newer kernel (kvm_intel's under Bochs, kvm_amd's under tcg-amd), with ``note`` after it."""
    later = "" if mode == "long" else "this mode's row measured on Debian Linux 6.12.118"
    return "; ".join(text for text in (later, note) if text)


def in_mode(name: str, mode: str) -> str:
    """The name of probe (or fact) ``name`` in CPU ``mode``: the plain name in long mode."""
    if mode not in MODES:
        raise InvalidArgument(f"mode={mode!r} is not a CPU mode of pykvm's guests: choose one of "
                              f"{', '.join(MODES)}")
    return name if mode == "long" else f"{name}_{mode}"


ScenarioFunction = Callable[[object], "Observation | tuple[Observation, ...]"]


@dataclasses.dataclass(frozen=True)
class Scenario:
    """A guest scenario and the rows it reports, in the order of the observations it returns."""

    function: ScenarioFunction
    rows: tuple[Expectation, ...]

    @property
    def name(self) -> str:
        return "+".join(row.probe for row in self.rows)

    def observe(self, kvm: object) -> dict[str, Observation]:
        """Run the scenario: its observations keyed by probe."""
        report = self.function(kvm)
        observations = report if isinstance(report, tuple) else (report,)
        if len(observations) != len(self.rows):
            raise TypeError(f"scenario {self.name} returned {len(observations)} observations "
                            f"for {len(self.rows)} probes")
        return {row.probe: observation for row, observation in zip(self.rows, observations, strict=True)}


# Every scenario, in registration order: the order of the table, the doctor and the docs.
SCENARIOS: list[Scenario] = []


def scenario(*rows: Expectation) -> Callable[[ScenarioFunction], ScenarioFunction]:
    """Register the decorated function as the scenario that measures ``rows``.

    It takes a :class:`pykvm.Kvm` and returns one :class:`Observation` per row, in
    order (a tuple when it reports several).
    """
    def register(function: ScenarioFunction) -> ScenarioFunction:
        SCENARIOS.append(Scenario(function, rows))
        return function
    return register
