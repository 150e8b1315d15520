"""Lab 5, The interrupt window: a userspace interrupt controller that works with and without window exits."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ...core.constants import Cap
from ...core.exits import IoExit, IrqWindowOpenExit
from ...guests import Command, GuestSession
from ..framework import Context, Fail, Lab, Step, StudentError, Support, lab_folder
from ..guest_task import booted
from ..verdict import Verdict, disagree


@dataclasses.dataclass
class InterruptWindowTask:
    guest: GuestSession
    vectors: list[int]

    def __repr__(self) -> str:
        return f"InterruptWindowTask(vectors={[hex(v) for v in self.vectors]})"


def _vectors(rng) -> list[int]:
    """The vectors the checker queues (drawn by the child for the task, by the runner for the verdict)."""
    return rng.sample(range(0x20, 0x100), 3)


def _scenario(ctx: Context) -> dict:
    vectors = _vectors(ctx.random("Controller"))
    ctx.load()
    ctx.trace.clear()
    with booted() as guest:
        vcpu = guest.vcpu
        controller = ctx.call("Controller", vcpu)
        borrowed = [cls.__qualname__ for cls in type(controller).__mro__ if cls.__module__.startswith("pykvm.")]
        if borrowed:
            raise Fail(f"Controller() returned a {type(controller).__name__}, which is (or inherits) pykvm's own "
                       f"{borrowed[0]}: write your own")
        vcpu.irq_controller = _Hook(ctx, controller)
        guest.command(Command.CLI)
        queued_at = len(ctx.trace.exits)
        for vector in vectors + [vectors[0]]:               # the last one is already pending
            _queue(ctx, controller, vector)
        guest.command(Command.SPIN, 2000)
        masked_log = guest.log()
        masked_exits = len(ctx.trace.exits)
        guest.command(Command.STI_NOP)
        for _ in range(6):
            guest.command(Command.NOP)
        vcpu.irq_controller = None
        return {"vectors": vectors, "log": guest.log(), "masked_log": masked_log,
                "masked_exits": masked_exits, "queued_at": queued_at, "exits": list(ctx.trace.exits),
                "injections": list(ctx.trace.injections), "sti_nop_end": guest.address("sti_nop_end")}


class _Hook:
    """What vcpu.irq_controller is: the student's before_entry(), its exceptions made the student's."""

    def __init__(self, ctx: Context, controller) -> None:
        self.ctx, self.controller = ctx, controller

    def before_entry(self) -> None:
        try:
            self.controller.before_entry()
        except BaseException as exc:   # noqa: B036
            raise StudentError(f"Controller.before_entry() raised {self.ctx.explain(exc)}") from None


def _queue(ctx: Context, controller, vector: int) -> None:
    try:
        controller.queue(vector)
    except BaseException as exc:   # noqa: B036
        raise Fail(f"Controller.queue({vector:#x}) raised {ctx.explain(exc)}") from None


def _run(ctx: Context) -> dict:
    return ctx.once("Controller", _scenario)


def check_held(ctx: Context) -> str:
    run = _run(ctx)
    if run["masked_log"]:
        raise Fail(f"the guest took {[hex(r.vector) for r in run['masked_log']]} while IF=0: your "
                   f"controller injected while the guest was not ready")
    bad = [i for i in run["injections"] if not i.ready or i.forced]
    if bad:
        raise Fail(f"KVM_INTERRUPT {bad[0].vector:#x} was made after an exit with "
                   f"ready_for_interrupt_injection=0")
    pending_masked = run["exits"][run["queued_at"]:run["masked_exits"]]
    if pending_masked and not all(r.request_window for r in pending_masked):
        raise Fail("while vectors were pending and the guest had IF=0, kvm_run.request_interrupt_window "
                   "was 0 at some entries: KVM was never asked to say when the window opens")
    return "nothing injected while IF=0; the window was requested at every entry"


def check_order(ctx: Context) -> str:
    run = _run(ctx)
    wanted = sorted(run["vectors"], reverse=True)
    got = [r.vector for r in run["log"]]
    if got != wanted:
        raise Fail(f"the guest took {[hex(v) for v in got]}; queued {[hex(v) for v in run['vectors']]} "
                   f"(and the first twice) should arrive once each, highest vector first: "
                   f"{[hex(v) for v in wanted]}")
    if not all(r.interrupts_were_enabled for r in run["log"]):
        raise Fail("a vector was taken with IF=0")
    return "taken once each, highest first: " + ", ".join(hex(v) for v in got)


def check_window(ctx: Context) -> str:
    run = _run(ctx)
    exits, injections = run["exits"], run["injections"]
    windows = [i for i, r in enumerate(exits) if isinstance(r.exit, IrqWindowOpenExit)]
    if not injections:
        raise Fail("nothing was injected")
    first = exits[injections[0].after_exits - 1]
    if ctx.host.sends_irq_window_exits:
        if not windows:
            raise Fail("this host sends KVM_EXIT_IRQ_WINDOW_OPEN, but none came: was "
                       "request_interrupt_window set while vectors waited?")
        if not isinstance(first.exit, IrqWindowOpenExit):
            raise Fail(f"the first vector was injected after {first.kind}, not at the window exit "
                       f"(RIP {exits[windows[0]].rip:#x}) that came first")
        detail = f"injected at KVM_EXIT_IRQ_WINDOW_OPEN (RIP {first.rip:#x})"
    elif isinstance(first.exit, IrqWindowOpenExit):
        # No exit at the `sti` here, but KVM checks the window at every entry: after an exit it handled in the
        # kernel (a host interrupt on a loaded host) the next entry finds IF=1 and exits for the window.
        detail = (f"this host sends no window exit at the `sti`, but an exit KVM handled in the kernel came "
                  f"after it, and the next entry found the window open: injected at that "
                  f"KVM_EXIT_IRQ_WINDOW_OPEN (RIP {first.rip:#x})")
    else:
        if not isinstance(first.exit, IoExit):
            raise Fail(f"the first vector was injected after {first.kind}")
        detail = (f"this host sends no window exit at the `sti`: injected at the next exit that reported ready "
                  f"(an IO exit at RIP {first.rip:#x})")
    if exits and exits[-1].request_window:
        raise Fail("with nothing pending, request_interrupt_window was still 1 at the last entry: "
                   "the guest pays a window exit for nothing")
    if not run["log"]:
        return f"{detail}; the guest's log holds no vector"
    taken = run["log"][0]
    return f"{detail}; the guest's log: {taken.vector:#x} taken at RIP {taken.rip:#x}"


def injected_by_kvm(in_order: bool) -> Callable[[Verdict], str]:
    """A step's rule: every KVM_INTERRUPT made when ready, not forced, and counted by KVM; ``in_order``: they
    were the queued vectors, highest first.

    KVM counts an injection again when an exit interrupts its delivery and it re-injects: at least as many.
    """
    def rule(verdict: Verdict) -> str:
        wanted = sorted(_vectors(verdict.random("Controller")), reverse=True)
        made = [(i.vector, i.forced, i.ready) for i in verdict.injections("Controller", "interrupt")]
        counted = [c["irq_injections"] for c in verdict.counters("Controller")]
        ready = all(ready and not forced for _, forced, ready in made)
        ordered = [vector for vector, _, _ in made] == wanted or not in_order
        if not made or not ready or not ordered or len(counted) != 1 or counted[0] < len(made):
            raise disagree(f"the KVM_INTERRUPTs made were {[(hex(v), f, r) for v, f, r in made]} (vector, forced, "
                           f"ready) and KVM counted {counted} injections; the queued vectors, highest first, are "
                           f"{[hex(v) for v in wanted]}")
        return f"KVM injected {counted[0]} interrupts"
    return rule


def _support(host) -> Support:
    if host.sends_irq_window_exits:
        return Support(True, "this host sends KVM_EXIT_IRQ_WINDOW_OPEN")
    return Support(True, "this host sends no KVM_EXIT_IRQ_WINDOW_OPEN: your controller injects at "
                         "the next exit that reports ready (the lab covers both)")


LAB = Lab(
    number=5, title="The interrupt window", minutes=50, folder=lab_folder(__file__),
    teaches="request_interrupt_window and KVM_EXIT_IRQ_WINDOW_OPEN; a userspace interrupt controller "
            "(pending vectors, priority, inject-when-ready) for hosts with and without window exits",
    requires=(Cap.IMMEDIATE_EXIT,),
    support=_support,
    steps=(
        Step("while IF=0 nothing is injected, and the window is requested", check_held,
             "before_entry() runs before every KVM_RUN: inject only if the last exit said ready; "
             "otherwise set vcpu.kvm_run.request_interrupt_window", injected_by_kvm(in_order=False)),
        Step("every queued vector arrives once, highest first", check_order,
             "a vector queued twice before delivery is one pending interrupt (an IRR bit); "
             "a higher vector has priority", injected_by_kvm(in_order=True)),
        Step("injected at the right exit for this host; window request cleared when idle", check_window,
             "on a host with window exits, inject at KVM_EXIT_IRQ_WINDOW_OPEN; on one without, at any "
             "exit with ready=1; and ask for the window only while something is pending",
             injected_by_kvm(in_order=False)),
    ),
)
