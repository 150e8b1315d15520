"""Lab 8, Exceptions from the host: KVM_SET_VCPU_EVENTS, pending or injected, error codes and CR2.

Each step hands the student a fresh long-mode guest stopped between two
instructions and one exception to make its next event; the checker reads back
what KVM holds (``KVM_GET_VCPU_EVENTS``, CR2 through ``KVM_GET_SREGS``) before
the guest runs, runs it, and judges what the guest's handler logged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from collections.abc import Callable, Iterator

from ...core.constants import Cap
from ...core.errors import PyKvmError
from ...core.interrupts import PAGE_FAULT_VECTOR
from ...guests import Command
from ...injection import Injector
from ...x86.vectors import vector_name
from ..framework import Context, Fail, Lab, Step, lab_folder
from ..guest_task import booted

RFLAGS_RF = 1 << 16
# Vectors the steps draw from. Left out: 1 (#DB: its payload is DR6), 2 (the NMI), 3 and 4 (#BP and
# #OF are raised by instructions; KVM does not report such "soft" exceptions back), 8 (#DF pushes 0),
# 18 (#MC), 14 (a step of its own).
WITHOUT_ERROR_CODE = (0, 5, 6, 7, 16, 19)
WITH_ERROR_CODE = (10, 11, 12, 13, 17)
COMMAND_TIMEOUT = 10.0     # a guest whose handler misreads its frame faults in a loop: stop it


@dataclasses.dataclass(frozen=True)
class HostExceptionTask:
    """The exception inject() must make the vCPU's next event."""

    vector: int
    error_code: int | None       # None: this vector pushes no error code
    cr2: int | None              # for #PF: the faulting address the handler must find in CR2
    pending: bool                # False: set it as injected; True: as pending, CR2 as its payload

    def __repr__(self) -> str:
        parts = [f"vector={self.vector} ({vector_name(self.vector).split()[0]})",
                 f"error_code={'None' if self.error_code is None else hex(self.error_code)}",
                 f"cr2={'None' if self.cr2 is None else hex(self.cr2)}", f"pending={self.pending}"]
        return f"HostExceptionTask({', '.join(parts)})"


def _draw(kind: str, rng: random.Random) -> HostExceptionTask:
    if kind == "plain":
        return HostExceptionTask(rng.choice(WITHOUT_ERROR_CODE), None, None, False)
    if kind == "code":
        return HostExceptionTask(rng.choice(WITH_ERROR_CODE), rng.randrange(1, 0x10000), None, False)
    address = rng.randrange(1 << 20, 1 << 47) & ~0x7
    return HostExceptionTask(PAGE_FAULT_VECTOR, rng.randrange(1, 0x20), address, kind == "pending")


@contextlib.contextmanager
def _events_by_hand() -> Iterator[None]:
    """While the student's inject() runs, pykvm's own Injector.exception() is not theirs to call."""
    original = Injector.exception

    def refuse(injector: Injector, *args: object, **kwargs: object) -> None:
        raise RuntimeError("pykvm.injection.Injector.exception() would do this lab for you: read vcpu.events, "
                           "fill in events.exception yourself and assign vcpu.events")
    Injector.exception = refuse           # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        Injector.exception = original     # type: ignore[method-assign]


def _scenario(kind: str) -> Callable[[Context], dict]:
    def scenario(ctx: Context) -> dict:
        rng = ctx.random(f"inject:{kind}")
        exception = _draw(kind, rng)
        stale_cr2 = rng.randrange(1 << 20, 1 << 47) & ~0xFFF     # what CR2 holds before: not the answer
        ctx.load()
        with booted() as guest:
            vcpu = guest.vcpu
            sregs = vcpu.sregs
            sregs.cr2 = stale_cr2
            vcpu.sregs = sregs
            guest.command(Command.NOP)                 # control: a run without an injection logs nothing
            control = guest.log()
            vcpu.complete_pending_exit()               # KVM finishes the `out`: the guest is between instructions
            with _events_by_hand():
                ctx.call("inject", vcpu, exception)
            run = {"exception": exception, "stale_cr2": stale_cr2, "control": control,
                   "held": vcpu.events,                # what KVM holds now, before the guest runs
                   "cr2_before": vcpu.sregs.cr2, "sync_done": guest.address("sync_done")}
            try:
                _judge_held(run)
            except Fail:
                return run      # the verdict is KVM's wrong event: running it would only fault in a loop
            stopped = ""
            try:
                guest.command(Command.NOP, timeout=COMMAND_TIMEOUT)
            except PyKvmError as exc:
                stopped = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            run.update(log=guest.log()[:4], stopped=stopped, after=vcpu.events.exception)
            return run
    return scenario


def _check(kind: str) -> Callable[[Context], str]:
    def check(ctx: Context) -> str:
        run = ctx.once(f"inject:{kind}", _scenario(kind))
        if run["control"]:
            raise Fail(f"the guest took {run['control']} before anything was injected (the checker's control run)")
        _judge_held(run)
        return _judge_log(run)
    return check


def _judge_held(run: dict) -> None:
    """What KVM_GET_VCPU_EVENTS and KVM_GET_SREGS reported after inject(), before the guest ran."""
    want: HostExceptionTask = run["exception"]
    held = run["held"]
    event = held.exception
    state = "pending" if want.pending else "injected"
    if not (event.pending or event.injected):
        why = ": your pending=1 did not reach it (when does KVM read that field?)" if want.pending else ""
        raise Fail(f"after inject() KVM held no exception (pending=0, injected=0): the guest will never see it{why}")
    if event.nr != want.vector:
        raise Fail(f"KVM held exception {event.nr}, not {want.vector}")
    if bool(event.pending) != want.pending:
        raise Fail(f"KVM held the exception as {'pending' if event.pending else 'injected'}; "
                   f"the task asked for {state}")
    if want.error_code is None and event.has_error_code:
        raise Fail(f"KVM held {vector_name(want.vector)} with has_error_code=1, but this vector pushes "
                   f"no error code: the frame would hold a word its handler does not expect (sheet, 'The error code')")
    if want.error_code is not None and not event.has_error_code:
        raise Fail(f"KVM held {vector_name(want.vector)} with has_error_code=0: no error code is pushed, so "
                   f"the handler takes the saved RIP for it (error_code={event.error_code:#x} is ignored)")
    if want.error_code is not None and event.error_code != want.error_code:
        raise Fail(f"KVM held error code {event.error_code:#x}, not {want.error_code:#x}")
    if want.pending:
        if not held.exception_has_payload or held.exception_payload != want.cr2:
            raise Fail(f"KVM held payload {held.exception_payload:#x} (has_payload="
                       f"{held.exception_has_payload}), not the address {want.cr2:#x}")
        if run["cr2_before"] == want.cr2:
            raise Fail("CR2 already held the address before the guest ran: for a pending #PF KVM writes "
                       "the payload into CR2 at delivery; do not write CR2 yourself")


def _judge_log(run: dict) -> str:
    want: HostExceptionTask = run["exception"]
    log = run["log"]
    stopped = f" (then the guest stopped: {run['stopped']})" if run["stopped"] else ""
    if not log:
        raise Fail(f"the guest took no exception{stopped}")
    first = log[0]
    problems = []
    if first.vector != want.vector:
        problems.append(f"vector {first.vector} ({first.name}), not {want.vector}")
    if first.error_code != want.error_code:
        shown = "none" if first.error_code is None else hex(first.error_code)
        problems.append(f"error code {shown}, not {'none' if want.error_code is None else hex(want.error_code)}")
    if want.cr2 is not None and first.cr2 != want.cr2:
        seen = "nothing" if first.cr2 is None else hex(first.cr2)
        stale = " (what CR2 held before you injected)" if first.cr2 == run["stale_cr2"] else ""
        problems.append(f"CR2 {seen}{stale}, not {want.cr2:#x}")
    if first.rip != run["sync_done"]:
        problems.append(f"saved RIP {first.rip:#x}, not {run['sync_done']:#x} (the next instruction)")
    if want.pending and not first.rflags & RFLAGS_RF:
        problems.append("RFLAGS.RF clear in the pushed image (KVM sets it when it delivers a pending fault)")
    if problems:
        raise Fail("the guest's handler logged " + "; ".join(problems) + stopped)
    if len(log) > 1 or run["stopped"]:
        raise Fail(f"after {first.name} the guest also took {[r.name for r in log[1:]]}{stopped}")
    if run["after"].pending or run["after"].injected:
        raise Fail("KVM still held an exception after the guest took it")
    detail = f"{first.name} at {first.rip:#x}"
    detail += f", error code {first.error_code:#x}" if first.error_code is not None else ", no error code"
    if first.cr2 is not None:
        detail += f", CR2 {first.cr2:#x}"
    if want.pending:
        detail += f"; CR2 was still {run['cr2_before']:#x} before the run, RF=1 in the frame"
    return detail


HOLD_HINT = ("read vcpu.events, replace events.exception with a pykvm.core.state.ExceptionEvent (nr, injected or "
             "pending, has_error_code, error_code), set events.flags, assign vcpu.events; "
             "sheet, 'Background'")

LAB = Lab(
    number=8, title="Exceptions from the host", minutes=45, folder=lab_folder(__file__),
    teaches="KVM_SET_VCPU_EVENTS: injected vs pending exceptions, has_error_code and the frame, CR2 "
            "for #PF, KVM_CAP_EXCEPTION_PAYLOAD and what KVM drops without it",
    requires=(Cap.VCPU_EVENTS, Cap.EXCEPTION_PAYLOAD),
    steps=(
        Step("an exception without an error code reaches its handler", _check("plain"), HOLD_HINT),
        Step("an exception with an error code: the handler finds that code", _check("code"),
             "has_error_code says whether the CPU pushes error_code; only some vectors push one "
             "(pykvm.x86.vectors.ERROR_CODE_VECTORS)"),
        Step("an injected #PF: the handler reads the address in CR2", _check("injected"),
             "an injected exception is delivered as it is: nothing writes CR2 for you; "
             "vcpu.sregs holds CR2 (read, change, assign)"),
        Step("a pending #PF: KVM writes CR2 from the payload at delivery", _check("pending"),
             "a pending exception needs KVM_CAP_EXCEPTION_PAYLOAD enabled on the VM and "
             "KVM_VCPUEVENT_VALID_PAYLOAD in events.flags; the address goes in the payload fields"),
    ),
)
