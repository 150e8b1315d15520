"""Lab 4, Ready or not: ready_for_interrupt_injection, if_flag, and injecting while IF=0."""

from __future__ import annotations

import dataclasses

from ...core.constants import Cap
from ...core.exits import FailEntryExit
from ...guests import Command, GuestSession
from ..framework import Context, Fail, Lab, Step, Support, lab_folder
from ..guest_task import booted
from ..verdict import Verdict, injected_once

DELIVERED, ENTRY_FAILED, HELD = "delivered", "entry failed", "held"
VMX_INVALID_GUEST_STATE = 0x80000021


@dataclasses.dataclass
class ReadyOrNotTask:
    """A booted long-mode guest, stopped at a sync point with IF=0, and the vector to inject."""

    guest: GuestSession
    vector: int

    def __repr__(self) -> str:
        return f"ReadyOrNotTask(guest=<long-mode guest, IF=0>, vector={self.vector:#x})"


def _vector(rng) -> int:
    """The vector a scenario asks for (drawn by the child for the task, by the runner for the verdict)."""
    return rng.randrange(0x20, 0x100)


def _ready_scenario(ctx: Context) -> dict:
    rng = ctx.random("inject_when_ready")
    ctx.load()
    ctx.trace.clear()
    with booted() as guest:
        guest.command(Command.CLI)
        task = ReadyOrNotTask(guest, _vector(rng))
        ctx.call("inject_when_ready", task)
        return {"task": task, "log": guest.log(), "injections": list(ctx.trace.injections)}


def check_ready(ctx: Context) -> str:
    run = ctx.once("inject_when_ready", _ready_scenario)
    vector = run["task"].vector
    injections = [i for i in run["injections"] if i.kind == "interrupt"]
    if not injections:
        raise Fail("inject_when_ready() never called vcpu.interrupt()")
    bad = [i for i in injections if not i.ready or i.forced]
    if bad:
        raise Fail(f"you injected while the last exit reported "
                   f"ready_for_interrupt_injection={bad[0].ready}, if_flag={bad[0].if_flag}")
    log = run["log"]
    if [r.vector for r in log] != [vector]:
        raise Fail(f"the guest logged {[hex(r.vector) for r in log] or 'nothing'}; task.vector was {vector:#x}"
                   + ("" if log else ": after KVM_INTERRUPT, the guest must run (a command) to take it"))
    if not log[0].interrupts_were_enabled:
        raise Fail("the guest took the vector with IF=0")
    return f"{vector:#x} taken with IF=1 at RIP {log[0].rip:#x}"


def _masked_scenario(ctx: Context) -> dict:
    rng = ctx.random("inject_while_masked")
    ctx.load()
    ctx.trace.clear()
    with booted() as guest:
        guest.command(Command.CLI)
        task = ReadyOrNotTask(guest, _vector(rng))
        answer = ctx.call("inject_while_masked", task)
        return {"task": task, "log": guest.log(), "answer": answer,
                "injections": list(ctx.trace.injections),
                "failed": [r.exit for r in ctx.trace.exits if isinstance(r.exit, FailEntryExit)]}


def _observed(run: dict) -> str:
    if run["failed"]:
        return ENTRY_FAILED
    return DELIVERED if any(r.vector == run["task"].vector for r in run["log"]) else HELD


def check_masked_injection(ctx: Context) -> str:
    run = ctx.once("inject_while_masked", _masked_scenario)
    task = run["task"]
    forced = [i for i in run["injections"] if i.kind == "interrupt" and i.forced]
    if not forced or forced[0].vector != task.vector:
        raise Fail(f"no KVM_INTERRUPT of task.vector={task.vector:#x} while the guest was not ready "
                   f"(the bare vcpu.interrupt())")
    if forced[0].if_flag or forced[0].ready:
        raise Fail("you forced the interrupt while the guest had IF=1: the task is to inject while IF=0")
    outcome = _observed(run)
    details = {DELIVERED: "KVM delivered it although IF=0 (the guest logged it with IF=0)",
               ENTRY_FAILED: f"the VM entry failed: {run['failed'][0]!r}" if run["failed"] else "",
               HELD: "the guest has not taken it (did it run after your KVM_INTERRUPT?)"}
    if outcome == HELD:
        raise Fail(details[HELD])
    return details[outcome]


def check_masked_answer(ctx: Context) -> str:
    run = ctx.once("inject_while_masked", _masked_scenario)
    outcome = _observed(run)
    answer = run["answer"]
    if answer not in (DELIVERED, ENTRY_FAILED, HELD):
        raise Fail(f"inject_while_masked() returned {answer!r}; answer one of "
                   f"{DELIVERED!r}, {ENTRY_FAILED!r}, {HELD!r}")
    if answer != outcome:
        raise Fail(f"you answered {answer!r}, but what KVM and the guest did was {outcome!r}")
    return f"{answer!r}: right for this host ({ctx.host.name}); {_recorded(ctx.host)}"


def ready_evidence(verdict: Verdict) -> str:
    return injected_once(verdict, "inject_when_ready", _vector(verdict.random("inject_when_ready")))


def masked_evidence(verdict: Verdict) -> str:
    return injected_once(verdict, "inject_while_masked", _vector(verdict.random("inject_while_masked")), forced=True)


def _recorded(host) -> str:
    """What pykvm's conformance table holds for this host's interrupt_not_ready probe."""
    try:
        from ...hosts.conformance import EXPECTATIONS
        known = EXPECTATIONS["interrupt_not_ready"].known(host.vendor)
        return f"pykvm's table records {str(known.outcome)!r} here"
    except (ImportError, KeyError, AttributeError):
        return "see python -m pykvm.doctor"


LAB = Lab(
    number=4, title="Ready or not", minutes=35, folder=lab_folder(__file__),
    teaches="ready_for_interrupt_injection and if_flag after each exit; what KVM_INTERRUPT does "
            "while the guest has IF=0, per host and per the KVM API",
    requires=(Cap.VCPU_EVENTS,),
    support=lambda host: Support(True, f"injecting while IF=0: {_recorded(host)}"),
    steps=(
        Step("inject_when_ready(): task.vector is taken with IF=1, injected only when ready",
             check_ready, "after each exit kvm_run says whether the guest can take an interrupt; "
                          "what must the guest execute before it can? (the Command enum)", ready_evidence),
        Step("inject_while_masked(): a forced KVM_INTERRUPT while IF=0, then the guest runs",
             check_masked_injection, "vcpu.interrupt(vector) is the bare KVM_INTERRUPT, which an Injector "
                                     "would refuse here; then let the guest run one command", masked_evidence),
        Step("inject_while_masked() answers what happened on this host", check_masked_answer,
             "look at the exit you got and at task.guest.log(): which of the three outcomes was it?",
             masked_evidence),
    ),
)
