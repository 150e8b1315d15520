"""What every request scenario shares: the verdicts, the timeline it records, the table row type, helpers.

Each scenario is ordinary pykvm code: a VM with a tiny long-mode guest
(assembled beside it), one host action that makes KVM raise the request, and
the evidence that KVM handled it before the next guest entry (an exit, a
counter of the vCPU or VM stats fd, a trace event, a change the guest can
see). ``control=True`` runs the same scenario without the trigger: the
evidence must then be absent. Verdicts are what this run measured.
"""

from __future__ import annotations

import contextlib
import dataclasses
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pykvm
from pykvm.core.errors import RunTimeout
from pykvm.core.exits import Exit, IoExit
from pykvm.core.stats import StatsDelta
from pykvm.hosts.vendor import VendorModule
from pykvm.irqchip import waiting
from pykvm.runtime import trace
from pykvm.runtime.watchdog import WATCHDOG

OBSERVED = "observed"
NO_EFFECT = "raised, no visible effect here"
UNREACHABLE = "not reachable here"
NOT_IMPLEMENTED = "not yet implemented in pykvm"

PORT_READY, PORT_HANDLER, PORT_LOOP = 0x10, 0x11, 0x12
DATA = 0x20000  # guest-physical page for records the guest shares (kvmclock, steal time)
MSR_KVM_SYSTEM_TIME_NEW = 0x4B564D01
MSR_KVM_STEAL_TIME = 0x4B564D03
PVCLOCK = struct.Struct("<IIQQIbB2x")  # struct pvclock_vcpu_time_info
PVCLOCK_TSC_STABLE, PVCLOCK_GUEST_STOPPED = 1, 2
EXTRA_SLOT_GPA = 0x2000000  # a second memory slot, above the default 16 MiB
SYS_MODULE = Path("/sys/module")


def module_parameter(module: str, name: str, sys_module: Path | str = SYS_MODULE) -> str | None:
    """``/sys/module/<module>/parameters/<name>`` read now, or None when the module or parameter is absent."""
    try:
        return (Path(sys_module) / module / "parameters" / name).read_text().strip()
    except OSError:
        return None


def is_on(value: str | None) -> bool:
    """Whether a boolean or integer module parameter's text says on ("Y" or "1")."""
    return value in ("Y", "1")


PVM, AMD, INTEL = VendorModule.PVM, VendorModule.AMD, VendorModule.INTEL


@dataclasses.dataclass(frozen=True)
class Request:
    """One ``KVM_REQ_*`` of x86 KVM: where it is made and handled, pykvm's trigger, its evidence."""

    name: str
    made_in: str
    handled_in: str
    trigger: str
    evidence: str
    explanation: str
    expected: dict[VendorModule, str] = dataclasses.field(default_factory=dict)
    needs: str = ""  # what a host lacks when the request is not reachable there
    amd_shadow: str = ""  # the verdict on kvm_amd loaded with npt=0 (shadow paging), where it differs


def request(
    name: str,
    made_in: str,
    handled_in: str,
    trigger: str,
    evidence: str,
    explanation: str,
    pvm: str = NOT_IMPLEMENTED,
    amd: str = NOT_IMPLEMENTED,
    needs: str = "",
    intel: str = NOT_IMPLEMENTED,
    amd_shadow: str = "",
) -> Request:
    """A table row; ``pvm``, ``amd`` and ``intel`` are the verdicts measured on those hosts before.

    ``amd`` is kvm_amd as loaded by default (npt=Y); ``amd_shadow`` the verdict measured with npt=0
    where it differs (the shadow-paging-only requests). ``intel`` is kvm_intel under Bochs
    (``python -m pykvm.hosts bochs-intel``: one host CPU, EPT and PML on, APICv off).
    """
    return Request(name, made_in, handled_in, trigger, evidence, explanation,
                   {PVM: pvm, AMD: amd, INTEL: intel}, needs, amd_shadow)


@dataclasses.dataclass
class Step:
    """One line of the timeline: ``kind`` is host, exit, stats, trace, guest or note."""

    kind: str
    text: str


@dataclasses.dataclass
class ScenarioResult:
    """What one run of a scenario measured."""

    request: str
    control: bool
    verdict: str
    why: str
    steps: list[Step] = dataclasses.field(default_factory=list)
    evidence: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def observed(self) -> bool:
        return self.verdict == OBSERVED

    def as_dict(self) -> dict[str, Any]:
        return {
            "request": self.request,
            "control": self.control,
            "verdict": self.verdict,
            "why": self.why,
            "steps": [dataclasses.asdict(step) for step in self.steps],
            "evidence": {key: _jsonable(value) for key, value in self.evidence.items()},
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    return repr(value)


class ScenarioRecorder:
    """Collects the steps of a run and the evidence it found."""

    def __init__(self, request: str, control: bool) -> None:
        self.outcome = ScenarioResult(request, control, NO_EFFECT, "")
        self.traced: trace.Recording | None = None
        self.trace_problem = ""

    def add(self, kind: str, text: str) -> None:
        self.outcome.steps.append(Step(kind, text))

    def host(self, text: str) -> None:
        self.add("host", text)

    def exit(self, exit: Exit) -> Exit:
        self.add("exit", repr(exit))
        return exit

    def stats(self, label: str, delta: StatsDelta, names: tuple[str, ...]) -> dict[str, Any]:
        values = {name: delta.get(name, 0) for name in names if name in delta}
        self.add("stats", f"{label}: " + (", ".join(f"{k} +{v}" for k, v in values.items()) or "nothing"))
        return values

    def guest(self, text: str) -> None:
        self.add("guest", text)

    @contextlib.contextmanager
    def trace(self, *events: str) -> Iterator[trace.Recording | None]:
        """Record ``events`` over the block where tracing is possible; a note otherwise."""
        try:
            context = trace.record(*events)
            recording = context.__enter__()
        except trace.TraceError as exc:
            self.trace_problem = str(exc)
            self.add("note", f"no trace events: {exc}")
            yield None
            return
        try:
            yield recording
        except BaseException:
            context.__exit__(None, None, None)
            raise
        context.__exit__(None, None, None)
        for event in recording.events:
            self.add("trace", event.describe())
        if recording.silent:
            self.add("trace", "silent: " + ", ".join(recording.silent))
        if recording.missing:
            self.add("trace", "not on this kernel: " + ", ".join(recording.missing))
        self.traced = recording

    def unreachable(self, why: str) -> ScenarioResult:
        """This host lacks what the request needs (``why`` names it, checked now): trigger and control alike."""
        self.outcome.verdict, self.outcome.why = UNREACHABLE, why
        return self.outcome

    def verdict(self, seen: bool, why: str, absent_why: str = "") -> ScenarioResult:
        """``observed`` when ``seen``; the control run's verdict says whether the evidence stayed absent."""
        outcome = self.outcome
        if outcome.control:
            outcome.verdict = "absent" if not seen else "present"
            outcome.why = absent_why or ("no trigger, no evidence" if not seen else "evidence without trigger")
        else:
            outcome.verdict = OBSERVED if seen else NO_EFFECT
            outcome.why = why
        return outcome


@contextlib.contextmanager
def machine(irqchip: str = "none", memory_size: int | None = None) -> Iterator[tuple[pykvm.Vm, pykvm.Vcpu]]:
    with pykvm.Kvm() as kvm, kvm.create_vm(irqchip=irqchip, memory_size=memory_size) as vm:
        yield vm, vm.create_vcpu()


RUN_DEADLINE = 60.0      # seconds one run_until() may take: each is a short guest step, even under emulation


def run_until(vcpu: pykvm.Vcpu, timeline: ScenarioRecorder, accept: Callable[[Exit], bool], limit: int = 50,
              deadline: float = RUN_DEADLINE) -> Exit:
    """Run until an exit ``accept`` takes (every exit goes on the timeline).

    A guest still inside ``KVM_RUN`` after ``deadline`` seconds (halted for an
    interrupt that does not come, say) is kicked out, and :class:`RunTimeout`
    says what it was waiting for. A vCPU halted then is run once more, as
    :meth:`pykvm.guests.GuestSession.command` does: reaching the exit in that
    grace means a lost wake-up, which the timeline notes and
    :class:`~pykvm.irqchip.waiting.LostWakeup` warns.
    """
    runs = iter(range(limit))          # the exits allowed, shared by the run and its grace
    try:
        return _run_until(vcpu, timeline, accept, runs, deadline)
    except RunTimeout as exc:
        halted, words = waiting.read_halted(vcpu)
        what = f"{timeline.outcome.request}: the vCPU did not reach the awaited exit within {deadline:g} s"
        if halted is None:
            raise RunTimeout(f"{what} ({exc}). At the deadline: {words}", exc.exit) from exc
        try:
            exit = _run_until(vcpu, timeline, accept, runs, waiting.grace(deadline))
        except RunTimeout as again:
            raise RunTimeout(f"{what}, nor in {waiting.grace(deadline):g} s more ({again}). At the deadline: "
                             f"{words}", exc.exit) from exc
        timeline.add("note", f"a lost wake-up: halted {deadline:g} s, the vCPU went on once re-entered ({words})")
        waiting.warn_lost_wakeup(timeline.outcome.request, deadline, halted)
        return exit


def _run_until(vcpu: pykvm.Vcpu, timeline: ScenarioRecorder, accept: Callable[[Exit], bool], runs: Iterator[int],
               deadline: float) -> Exit:
    expired: list[bool] = []

    def expire() -> None:
        expired.append(True)
        vcpu.kick()
    with WATCHDOG.guard(deadline, expire):
        for _ in runs:
            exit = vcpu.run()
            if expired:
                raise RunTimeout(f"kicked at RIP {vcpu.regs.rip:#x}", exit)
            if accept(exit):
                return timeline.exit(exit)
    raise pykvm.PyKvmError(f"{timeline.outcome.request}: the guest made all its allowed exits (run_until's "
                           f"limit) without the awaited one")


def is_port(port: int) -> Callable[[Exit], bool]:
    return lambda exit: isinstance(exit, IoExit) and exit.port == port


def io_port(exit: Exit) -> int | None:
    return exit.port if isinstance(exit, IoExit) else None
