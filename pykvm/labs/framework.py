"""What a lab is made of, and what its checker steps are given when they run.

Why this exists: a lab is a sheet, a starter and a list of checker steps; the
steps run in a child process (:mod:`pykvm.labs.child`) next to the student's
code and judge what happened in the guest and in KVM. This module holds the
pieces a lab module uses: :class:`Lab`, :class:`Step`, :class:`Fail`, the
step context :class:`Context` (the student's module, randomness, the host's
facts, a :class:`Trace` of every vCPU, exit and injection) and
:class:`Support` (can this host run the lab fully).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import random
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ..core.constants import Cap
from ..core.eventfds import Irqfd
from ..core.exits import Exit, FailEntryExit, InternalErrorExit, IoExit
from ..core.interrupts import MsiMessage
from ..core.stats import Stats
from ..core.vcpu import Vcpu
from ..core.vm import Vm
from ..hosts import HostInfo, explain_exit

if TYPE_CHECKING:
    from .verdict import Verdict

STUDENT_FILE = "lab.py"          # the starter's name in the student's directory
SHEET_FILE = "sheet.md"


@dataclasses.dataclass(frozen=True)
class Support:
    """Whether this host runs a lab fully, and what the student will see differ."""

    full: bool
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Step:
    """One line of the checklist: ``check(ctx)`` returns a detail or raises :class:`Fail`.

    ``hint`` is printed when the step fails: it teaches where to look, never the answer.
    ``check`` runs beside the student's code, so its word is a diagnosis; ``evidence(verdict)``
    runs in the checker's own process on what KVM counted (:mod:`pykvm.labs.verdict`) and
    returns a detail or raises :class:`Fail`.
    """

    title: str
    check: Callable[[Context], str | None]
    hint: str
    evidence: Callable[[Verdict], str] | None = None    # the runner's own judgement (pykvm.labs.verdict)


@dataclasses.dataclass(frozen=True)
class Lab:
    """One lab: its folder holds ``sheet.md`` and ``starter.py`` beside the module defining it."""

    number: int
    title: str
    teaches: str
    minutes: int
    steps: Sequence[Step]
    folder: Path
    requires: tuple[Cap, ...] = ()
    support: Callable[[HostInfo], Support] = lambda host: Support(True)

    @property
    def sheet(self) -> str:
        return (self.folder / "sheet.md").read_text()

    @property
    def starter(self) -> str:
        return (self.folder / "starter.py").read_text()


class Fail(Exception):
    """A step failed: ``reason`` says what was seen; ``hint`` replaces the step's hint."""

    def __init__(self, reason: str, hint: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.hint = hint


class StudentError(Fail):
    """The student's code raised (or an earlier run of it failed): the reason names where."""


def task_random(seed: int, key: str) -> random.Random:
    """The generator of scenario ``key``'s task: the child draws the task from it, the runner its expectations."""
    return random.Random(f"{seed}:{key}")


# -- the trace: what KVM did, recorded beside the student's code ---------------------------

@dataclasses.dataclass
class ExitRecord:
    """One exit of a traced vCPU, with the registers KVM reported right after it."""

    vcpu: int
    exit: Exit
    rip: int
    linear_rip: int
    rax: int
    rbx: int
    rcx: int
    rdx: int
    rsp: int
    rflags: int
    ready: int
    if_flag: int
    request_window: int
    stats: dict[str, int] | None = None
    thread: int = 0             # threading.get_ident() of the thread whose KVM_RUN returned it

    @property
    def kind(self) -> str:
        return type(self.exit).__name__

    @property
    def port(self) -> int:
        """The IO port of an IO exit, else -1."""
        return self.exit.port if isinstance(self.exit, IoExit) else -1

    @property
    def value(self) -> int:
        """What an OUT wrote (an IN: what kvm_run held), else -1."""
        return self.exit.value if isinstance(self.exit, IoExit) else -1


@dataclasses.dataclass
class InjectionRecord:
    """One KVM_INTERRUPT or KVM_NMI the student's code issued, and the state it was issued in."""

    vcpu: int
    kind: str                   # "interrupt" or "nmi"
    vector: int
    forced: bool                # KVM_INTERRUPT made although the last exit reported not ready
    after_exits: int            # how many exits of that vCPU the trace had seen
    ready: int                  # kvm_run.ready_for_interrupt_injection at the time
    if_flag: int
    rip: int


@dataclasses.dataclass
class SendRecord:
    """One interrupt sent through the VM rather than a vCPU: KVM_SIGNAL_MSI, KVM_IRQ_LINE or an irqfd write."""

    kind: str                   # "signal_msi", "irq_line" or "irqfd"
    thread: int                 # threading.get_ident() of the sending thread
    gsi: int                    # the GSI raised (irq_line, irqfd), -1 for an MSI
    message: MsiMessage | None  # the MSI sent (signal_msi)
    level: int                  # the line level (irq_line), 1 otherwise
    after_exits: int            # how many exits (of any vCPU) the trace had seen


class Trace:
    """Every vCPU created, every exit and every injection, recorded by wrapping :class:`Vcpu`.

    Installed once in the child process before the student's module is imported;
    the checker reads it, never what the student's functions return.
    """

    def __init__(self) -> None:
        self.vcpus: list[Vcpu] = []
        self.exits: list[ExitRecord] = []
        self.injections: list[InjectionRecord] = []
        self.sends: list[SendRecord] = []
        self.stats_names: tuple[str, ...] = ()      # stats read after each exit, if any
        self.slots: dict[int, tuple] = {}           # id(vcpu) -> its VM's memory slots at its first exit
        self.composed = 0                           # calls of MsiMessage.compose so far
        self.scenario = ""                          # the key of the innermost scenario running
        self._send: Callable[[dict, tuple[int, ...]], None] = lambda message, fds: None
        self._installed = False

    def install(self, send: Callable[[dict, tuple[int, ...]], None] | None = None) -> None:
        """Wrap pykvm's classes; ``send(message, fds)`` streams each vCPU's stats fd and each injection."""
        if send is not None:
            self._send = send
        if self._installed:
            return
        self._installed = True
        trace = self
        original_init, original_run = Vcpu.__init__, Vcpu.run
        original_interrupt, original_nmi = Vcpu.interrupt, Vcpu.nmi
        original_msi, original_line, original_trigger = Vm.signal_msi, Vm.irq_line, Irqfd.trigger
        original_compose = MsiMessage.compose.__func__      # type: ignore[attr-defined]

        def init(vcpu: Vcpu, *args: Any, **kwargs: Any) -> None:
            original_init(vcpu, *args, **kwargs)
            trace.vcpus.append(vcpu)
            trace._send_stats(vcpu)

        def compose(cls: type[MsiMessage], *args: Any, **kwargs: Any) -> MsiMessage:
            trace.composed += 1
            return original_compose(cls, *args, **kwargs)

        def run(vcpu: Vcpu) -> Exit:
            exit = original_run(vcpu)
            if isinstance(exit, (FailEntryExit, InternalErrorExit)):
                explain_exit(vcpu, exit)        # what such an exit means on this host, for the student
            trace._record_exit(vcpu, exit)
            return exit

        def interrupt(vcpu: Vcpu, vector: int) -> None:
            # Forced: the bare KVM_INTERRUPT while the last exit reported not ready (an Injector refuses that).
            trace._record_injection(vcpu, "interrupt", vector, not vcpu.kvm_run.ready_for_interrupt_injection)
            original_interrupt(vcpu, vector)

        def nmi(vcpu: Vcpu) -> None:
            trace._record_injection(vcpu, "nmi", 2, False)
            original_nmi(vcpu)

        def signal_msi(vm: Vm, message: MsiMessage | None = None, **fields: Any) -> int:
            result = original_msi(vm, message, **fields)
            trace._record_send("signal_msi", -1, message or MsiMessage.compose(**fields), 1)
            return result

        def irq_line(vm: Vm, gsi: int, level: int | bool) -> int | None:
            result = original_line(vm, gsi, level)
            trace._record_send("irq_line", gsi, None, int(level))
            return result

        def trigger(irqfd: Irqfd) -> None:
            original_trigger(irqfd)
            trace._record_send("irqfd", irqfd.gsi, None, 1)

        MsiMessage.compose = classmethod(compose)   # type: ignore[method-assign, assignment]
        Vm.signal_msi = signal_msi       # type: ignore[method-assign, assignment]
        Vm.irq_line = irq_line           # type: ignore[method-assign, assignment]
        Irqfd.trigger = trigger          # type: ignore[method-assign, assignment]
        Vcpu.__init__ = init             # type: ignore[method-assign, assignment]
        Vcpu.run = run                   # type: ignore[method-assign, assignment]
        Vcpu.interrupt = interrupt       # type: ignore[method-assign, assignment]
        Vcpu.nmi = nmi                   # type: ignore[method-assign, assignment]

    def clear(self) -> None:
        self.slots.clear()
        self.vcpus.clear()
        self.exits.clear()
        self.injections.clear()
        self.sends.clear()

    def _send_stats(self, vcpu: Vcpu) -> None:
        """Hand the checker's process a stats fd of ``vcpu``: KVM's own counters, readable after the VM is gone."""
        if not vcpu.vm.kvm.check_extension(Cap.BINARY_STATS_FD):
            return
        with Stats.open(vcpu) as stats:
            self._send({"event": "vcpu", "key": self.scenario}, (stats.fd,))

    def _record_exit(self, vcpu: Vcpu, exit: Exit) -> None:
        from ..x86.modes import linear_rip
        regs, sregs, run = vcpu.regs, vcpu.sregs, vcpu.kvm_run
        stats = None
        if self.stats_names:
            values = vcpu.stats.read()
            stats = {name: int(values[name]) for name in self.stats_names  # type: ignore[arg-type]
                     if name in values}
        self.slots.setdefault(id(vcpu), vcpu.vm.memory.slots)
        self.exits.append(ExitRecord(vcpu.id, exit, regs.rip, linear_rip(sregs, regs.rip), regs.rax,
                                     regs.rbx, regs.rcx, regs.rdx, regs.rsp, regs.rflags,
                                     run.ready_for_interrupt_injection, run.if_flag,
                                     run.request_interrupt_window, stats, threading.get_ident()))

    def _record_send(self, kind: str, gsi: int, message: MsiMessage | None, level: int) -> None:
        self.sends.append(SendRecord(kind, threading.get_ident(), gsi, message, level, len(self.exits)))

    def _record_injection(self, vcpu: Vcpu, kind: str, vector: int, forced: bool) -> None:
        run = vcpu.kvm_run
        seen = sum(1 for record in self.exits if record.vcpu == vcpu.id)
        record = InjectionRecord(vcpu.id, kind, vector, bool(forced), seen, run.ready_for_interrupt_injection,
                                 run.if_flag, self.exits[-1].rip if self.exits else -1)
        self.injections.append(record)
        self._send({"event": "injection", "key": self.scenario, **dataclasses.asdict(record)}, ())


TRACE = Trace()


# -- the context a step runs in -------------------------------------------------------------

class Context:
    """What a step's ``check`` gets: the student's module, randomness, the host, the trace.

    ``ctx.once(key, scenario)`` runs ``scenario(ctx)`` once per child process and
    caches its result (or its failure) for the later steps that judge the same run;
    ``ctx.call(name, *args)`` calls the student's function and turns an exception
    into a :class:`StudentError` that points at the student's line.
    """

    def __init__(self, student_file: Path, seed: int, host: HostInfo, broken: dict[str, str],
                 announce: Callable[[dict], None] = lambda message: None) -> None:
        self.student_file = Path(student_file)
        self.seed = seed
        self.rng = random.Random(seed)
        self.host = host
        self.trace = TRACE
        self._broken = dict(broken)
        self._cache: dict[str, tuple[bool, Any, int]] = {}
        self._announce = announce
        self._module: ModuleType | None = None
        self.step = 0                 # the index of the step running now (set by the child)

    def random(self, key: str) -> random.Random:
        """A generator for scenario ``key``: the same seed gives the same task in any child."""
        return task_random(self.seed, key)

    # -- the student's code -------------------------------------------------------------
    def load(self) -> ModuleType:
        """Import the student's file now (a scenario's first line: its failure is the step's)."""
        return self.student

    @property
    def student(self) -> ModuleType:
        if self._module is None:
            self._module = self.once("import", lambda ctx: ctx._import())
        return self._module

    def _import(self) -> ModuleType:
        name = "pykvm_lab_student"
        spec = importlib.util.spec_from_file_location(name, self.student_file)
        if spec is None or spec.loader is None:
            raise Fail(f"cannot import {self.student_file}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException as exc:   # noqa: B036 - SystemExit in a student's file is a failure too
            raise StudentError(f"importing {self.student_file.name} raised {self.explain(exc)}") from None
        return module

    def call(self, name: str, *args: Any) -> Any:
        """Call the student's function ``name``; an exception becomes a :class:`StudentError`."""
        function = getattr(self.student, name, None)
        if not callable(function):
            raise StudentError(f"{self.student_file.name} defines no function {name}()")
        try:
            return function(*args)
        except BaseException as exc:   # noqa: B036
            raise StudentError(f"{name}() raised {self.explain(exc)}") from None

    def explain(self, exc: BaseException) -> str:
        """``Type: message (lab.py line N)``: the student's innermost frame, if any."""
        where = ""
        for frame in reversed(traceback.extract_tb(exc.__traceback__)):
            if Path(frame.filename).resolve() == self.student_file.resolve():
                where = f" ({self.student_file.name} line {frame.lineno}: {(frame.line or '').strip()})"
                break
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"{type(exc).__name__}{': ' + message if message else ''}{where}"

    # -- runs shared by several steps ------------------------------------------------------------
    def once(self, key: str, scenario: Callable[[Context], Any]) -> Any:
        """``scenario(self)``, run once; its result, or (for later steps) "not checked" and why."""
        if key in self._broken:
            raise StudentError(f"not checked: {self._broken[key].splitlines()[0]}")
        if key not in self._cache:
            self._announce({"event": "begin", "key": key})
            outer, self.trace.scenario = self.trace.scenario, key
            try:
                self._cache[key] = (True, scenario(self), self.step)
            except Fail as exc:
                self._cache[key] = (False, exc, self.step)
            except Exception as exc:   # the checker's own scenario broke: say so, do not crash
                self._cache[key] = (False, Fail(f"the checker's scenario {key!r} failed: "
                                                f"{type(exc).__name__}: {exc}"), self.step)
            finally:
                self.trace.scenario = outer
            self._announce({"event": "end", "key": key})
        ok, value, step = self._cache[key]
        if ok:
            return value
        if step == self.step:
            raise value
        raise StudentError(f"not checked: step {step + 1} failed", value.hint)

def lab_folder(module_file: str) -> Path:
    """The folder of a lab module (``Path(__file__).parent``), where its sheet and starter are."""
    return Path(module_file).resolve().parent
