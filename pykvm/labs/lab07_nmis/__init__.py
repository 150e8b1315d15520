"""Lab 7, NMIs: KVM_NMI, NMI blocking until IRET, and when a held NMI is taken."""

from __future__ import annotations

import dataclasses

from ...core.constants import Cap
from ...guests import Command, GuestSession
from ...guests import load as load_image
from ...x86.vectors import Vector
from ..framework import Context, Fail, Lab, Step, Support, lab_folder
from ..guest_task import booted, handler_range
from ..verdict import Verdict, disagree


@dataclasses.dataclass
class NmiTask:
    guest: GuestSession
    count: int                   # how many NMIs the guest must take, each raised inside the previous one's handler
    interrupts_enabled: bool     # the guest's IF (NMIs ignore it)

    def __repr__(self) -> str:
        return f"NmiTask(guest=<long-mode guest, notify mode>, count={self.count}, IF={int(self.interrupts_enabled)})"


def _parameters(rng) -> tuple[bool, int]:
    """The guest's IF and how many NMIs (drawn by the child for the task, by the runner for the verdict)."""
    enabled = rng.random() < 0.5
    return enabled, rng.randrange(2, 5)


def _scenario(ctx: Context) -> dict:
    enabled, count = _parameters(ctx.random("nmis"))
    ctx.load()
    with booted(notify=True) as guest:
        guest.command(Command.STI if enabled else Command.CLI)
        ctx.trace.clear()
        task = NmiTask(guest, count, enabled)
        ctx.call("nmis", task)
        return {"task": task, "log": guest.log(), "handler": handler_range(guest),
                "injections": [i for i in ctx.trace.injections if i.kind == "nmi"],
                "exits": list(ctx.trace.exits)}


def _run(ctx: Context) -> dict:
    return ctx.once("nmis", _scenario)


def check_count(ctx: Context) -> str:
    run = _run(ctx)
    task = run["task"]
    nmis = [r for r in run["log"] if r.vector == Vector.NMI]
    others = [hex(r.vector) for r in run["log"] if r.vector != Vector.NMI]
    if others:
        raise Fail(f"the guest also took vectors {others}")
    if len(run["injections"]) != task.count:
        raise Fail(f"you called vcpu.nmi() {len(run['injections'])} times; task.count is {task.count}")
    if len(nmis) != task.count:
        raise Fail(f"the guest took {len(nmis)} NMIs, not task.count={task.count}" +
                   (": an NMI raised while another is pending is lost (one pending NMI at most)"
                    if len(nmis) < task.count else ""))
    return f"{task.count} NMIs taken"


def check_blocked(ctx: Context) -> str:
    run = _run(ctx)
    injections, handler = run["injections"], run["handler"]
    outside = [n for n, i in enumerate(injections[1:], 2) if i.rip not in handler]
    if not injections or outside:
        raise Fail(f"NMI #{outside[0] if outside else 1} was raised while the guest was not inside an "
                   f"NMI handler: stop the guest inside the handler first (notify mode: a VECTOR stop)")
    return f"NMIs 2..{len(injections)} raised inside the previous NMI's handler"


def check_not_nested(ctx: Context) -> str:
    run = _run(ctx)
    task, handler = run["task"], run["handler"]
    nmis = [r for r in run["log"] if r.vector == Vector.NMI]
    nested = [r for r in nmis if r.rip in handler]
    if nested:
        raise Fail(f"an NMI interrupted the NMI handler itself (at RIP {nested[0].rip:#x})")
    wrong_if = [r for r in nmis if r.interrupts_were_enabled != task.interrupts_enabled]
    if wrong_if or not nmis:
        raise Fail("the NMIs' saved RFLAGS.IF differs from the guest's" if nmis else "no NMI was taken")
    where = "right after the handler's IRET" if ctx.host.nmi_delivered_at_iret else \
        "only at the next VM entry after the IRET (this host has no NMI-window exit)"
    return f"each held NMI was taken outside the handler, IF={int(task.interrupts_enabled)}; here {where}"


def counted_by_kvm(verdict: Verdict) -> str:
    """KVM injected (at least: a re-injection counts again) every NMI made, and task.count were made."""
    _, count = _parameters(verdict.random("nmis"))
    counted = [c["nmi_injections"] for c in verdict.counters("nmis")]
    made = verdict.injections("nmis", "nmi")
    if len(counted) != 1 or counted[0] < len(made) or len(made) != count:
        raise disagree(f"KVM counted {counted} NMI injections and {len(made)} KVM_NMIs were made; the task "
                       f"asks for {count}, each injected")
    return f"KVM injected {counted[0]} NMIs"


def raised_in_handler(verdict: Verdict) -> str:
    """NMIs 2.. were made while the guest was stopped inside the handler, as the hook saw them then."""
    made = verdict.injections("nmis", "nmi")
    image = load_image("long")
    handler = range(image.address("handler_common"), image.address("handler_iret") + 1)
    outside = [n for n, nmi in enumerate(made[1:], 2) if nmi.rip not in handler]
    if len(made) < 2 or outside:
        raise disagree(f"NMI #{outside[0]} was made at RIP {made[outside[0] - 1].rip:#x}, outside the NMI "
                       f"handler" if outside else f"{len(made)} KVM_NMIs were made",
                       by="the KVM_NMIs as the checker saw them made")
    return counted_by_kvm(verdict)


def _support(host) -> Support:
    if host.nmi_delivered_at_iret:
        return Support(True, "a held NMI is taken right after the handler's IRET")
    return Support(True, "a held NMI waits for the next VM entry after the handler's IRET "
                         "(no NMI-window exit on this host): run the guest again to see it")


LAB = Lab(
    number=7, title="NMIs", minutes=40, folder=lab_folder(__file__),
    teaches="KVM_NMI, NMIs ignore IF, NMI blocking from delivery until IRET, one pending NMI at most, "
            "and when a held NMI is taken (NMI window, per host)",
    requires=(Cap.USER_NMI, Cap.VCPU_EVENTS),
    support=_support,
    steps=(
        Step("the guest takes exactly task.count NMIs", check_count,
             "KVM keeps at most one NMI pending besides the one being handled: raise the next only "
             "once the previous one is being handled", counted_by_kvm),
        Step("each NMI after the first is raised inside the previous NMI's handler", check_blocked,
             "in notify mode the handler reports its vector with an `out` before its IRET: "
             "guest.run_until(StopKind.VECTOR) stops there; vcpu.events.nmi.masked says NMIs are blocked",
             raised_in_handler),
        Step("no NMI nests inside a handler, and IF did not matter", check_not_nested,
             "a held NMI is taken after the IRET; on some hosts only at the next VM entry: keep the "
             "guest running (commands) until the log holds them all", counted_by_kvm),
    ),
)
