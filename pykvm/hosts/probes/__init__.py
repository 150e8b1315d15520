"""Small guest scenarios that measure how this host's KVM delivers events, and their runner.

Why this exists: hosts legitimately differ (:mod:`pykvm.hosts.conformance`) in
when the interrupt window opens, where RIP points at an IO exit, which shadows
they honour, and what their instruction emulator can run. ``python -m
pykvm.doctor`` runs every scenario through pykvm itself (:func:`run_probes`) and
compares each outcome with the table, so a test author can tell "KVM is broken"
from "this host differs".

One module per probe family, each holding, like a KVM selftest keeps its guest
code beside its test, the family's outcomes (an :class:`~.base.ProbeOutcome` enum),
its rows of the conformance table and the scenarios that measure them:

* :mod:`.exits`: io_exit_rip, irq_window, interrupt_not_ready (userspace irqchip)
* :mod:`.nmi`: nmi_blocking, nmi_window
* :mod:`.lapic`: lapic_after_sti, lapic_isr (in-kernel LAPIC)
* :mod:`.shadows`: sti_shadow, mov_ss_shadow
* :mod:`.stepping`: single_step, step_sti_shadow, hlt_single_step
* :mod:`.delivery`: triple_fault, and per CPU mode an injected vector, INT n, INT3 (and real_mode_ud2)

irq_window, interrupt_not_ready, nmi_blocking, nmi_window and step_sti_shadow
run in each CPU mode too (:data:`.base.MODES`), where KVM can take another
path: the long-mode row keeps the plain name, the others add the mode
(``nmi_blocking_real``).

:mod:`.base` defines what they are made of, :mod:`.harness` what their scenarios
share. The families register in the order imported here, which is the order of
the table, the doctor's report and the docs.
"""

from __future__ import annotations

from collections.abc import Iterable

from ...core.errors import CapabilityMissing, GuestError

# isort: off
from . import exits, nmi, lapic, shadows, stepping, delivery  # noqa: F401  (they register in this order)
# isort: on
from .base import SCENARIOS, Expectation, Known, Observation, ProbeOutcome, Result, Scenario
from .harness import internal_error

__all__ = ["SCENARIOS", "Expectation", "Known", "Observation", "ProbeOutcome", "Result", "Scenario",
           "run_probes"]


def _observe(scenario: Scenario, kvm) -> dict[str, Observation]:
    """One scenario's observations; what stopped it, when something did, as every probe's outcome."""
    try:
        return scenario.observe(kvm)
    except CapabilityMissing as exc:
        outcome, detail = None, f"{type(exc).__name__}: {exc}"
    except GuestError as exc:
        exit = internal_error(exc)
        if exit is None:
            outcome, detail = Result.PROBE_FAILED, f"{scenario.name}: {type(exc).__name__}: {exc}"
        else:
            outcome = Result.INTERNAL_ERROR
            detail = f"{scenario.name}: KVM_EXIT_INTERNAL_ERROR: {str(exc) or repr(exit)}"
    except Exception as exc:
        outcome, detail = Result.PROBE_FAILED, f"{scenario.name}: {type(exc).__name__}: {exc}"
    return {row.probe: Observation(outcome, detail) for row in scenario.rows}


def run_probes(kvm, scenarios: Iterable[Scenario] = SCENARIOS) -> dict[str, Observation]:
    """Every scenario's probes, in order; never raises for a scenario.

    A capability the host lacks makes the scenario's probes unsupported (outcome
    None); a KVM_EXIT_INTERNAL_ERROR that stopped it is :attr:`Result.INTERNAL_ERROR`,
    with the exit as evidence (a verdict about the host: "differs"); anything else
    that broke it is :attr:`Result.PROBE_FAILED` (the doctor reports it and goes on).
    """
    observed: dict[str, Observation] = {}
    for scenario in scenarios:
        observed.update(_observe(scenario, kvm))
    return observed
