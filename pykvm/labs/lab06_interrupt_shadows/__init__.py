"""Lab 6, Interrupt shadows: STI and MOV SS, observed by single-stepping."""

from __future__ import annotations

import dataclasses

from ...core.constants import Cap
from ...core.exits import DebugExit
from ...guests import Command, GuestSession
from ..framework import Context, Fail, Lab, Step, Support, lab_folder
from ..guest_task import booted
from ..verdict import Verdict, injected_once


@dataclasses.dataclass
class InterruptShadowTask:
    guest: GuestSession
    vector: int

    def __repr__(self) -> str:
        return f"InterruptShadowTask(guest=<long-mode guest>, vector={self.vector:#x})"


def _vector(rng) -> int:
    """The task's vector (drawn by the child for the task, by the runner for the verdict)."""
    return rng.randrange(0x20, 0x100)


def _sti_scenario(ctx: Context) -> dict:
    rng = ctx.random("inject_after_sti")
    ctx.load()
    with booted() as guest:
        guest.command(Command.CLI)
        ctx.trace.clear()
        task = InterruptShadowTask(guest, _vector(rng))
        ctx.call("inject_after_sti", task)
        guest.vcpu.set_single_step(False)
        return {"task": task, "log": guest.log(), "exits": list(ctx.trace.exits),
                "injections": list(ctx.trace.injections),
                "labels": {name: guest.address(name) for name in ("sti_nop_sti", "sti_nop_nop", "sti_nop_end")}}


def check_stepped(ctx: Context) -> str:
    run = ctx.once("inject_after_sti", _sti_scenario)
    rips = [r.rip for r in run["exits"] if isinstance(r.exit, DebugExit)]
    if run["labels"]["sti_nop_sti"] not in rips:
        raise Fail("no single-step (KVM_EXIT_DEBUG) stopped at the `sti`: the checker cannot see that "
                   "you watched the shadow")
    after = rips[rips.index(run["labels"]["sti_nop_sti"]) + 1:]
    names = {v: k for k, v in run["labels"].items()}
    return "single-step stops: sti" + "".join(f", {names.get(rip, hex(rip))}" for rip in after[:3])


def check_sti_injection(ctx: Context) -> str:
    run = ctx.once("inject_after_sti", _sti_scenario)
    task = run["task"]
    injections = [i for i in run["injections"] if i.kind == "interrupt"]
    if not injections or injections[0].vector != task.vector:
        raise Fail(f"no KVM_INTERRUPT of task.vector={task.vector:#x}")
    if injections[0].forced or not injections[0].ready:
        names = {v: k for k, v in run["labels"].items()}
        raise Fail(f"you injected (forced) at {names.get(injections[0].rip, hex(injections[0].rip))}, "
                   f"where KVM reported ready_for_interrupt_injection=0")
    return f"injected once the exit reported ready (RIP {injections[0].rip:#x})"


def check_sti_taken(ctx: Context) -> str:
    run = ctx.once("inject_after_sti", _sti_scenario)
    task, labels = run["task"], run["labels"]
    taken = [r for r in run["log"] if r.vector == task.vector]
    if not taken:
        raise Fail(f"the guest never took {task.vector:#x}: after injecting, stop single-stepping and "
                   f"let it run to its sync point")
    names = {v: k for k, v in labels.items()}
    where = names.get(taken[0].rip, hex(taken[0].rip))
    if taken[0].rip != labels["sti_nop_end"] or not taken[0].interrupts_were_enabled:
        raise Fail(f"the guest took it at {where} with IF={int(taken[0].interrupts_were_enabled)}: "
                   f"the first point after `sti` where an interrupt is allowed is after the nop")
    return "taken after the shadowed nop, IF=1"


def _mov_ss_scenario(ctx: Context) -> dict:
    ctx.load()
    with booted() as guest:
        guest.command(Command.STI)
        ctx.trace.clear()
        answer = ctx.call("mov_ss_steps", InterruptShadowTask(guest, 0))
        guest.vcpu.set_single_step(False)
        return {"answer": answer, "rips": [r.rip for r in ctx.trace.exits if isinstance(r.exit, DebugExit)],
                "labels": {name: guest.address(name) for name in ("mov_ss_mov", "mov_ss_nop", "mov_ss_end")}}


def check_mov_ss(ctx: Context) -> str:
    run = ctx.once("mov_ss_steps", _mov_ss_scenario)
    labels, rips = run["labels"], run["rips"]
    if labels["mov_ss_mov"] not in rips:
        raise Fail("no single-step stopped at `mov %ax, %ss` (label mov_ss_mov)")
    seen = rips[rips.index(labels["mov_ss_mov"]):]
    answer = run["answer"]
    if not isinstance(answer, list) or [int(a) for a in answer] != seen[:len(answer)] or len(answer) < 2:
        raise Fail(f"mov_ss_steps() returned {answer!r}; KVM's debug exits from mov_ss_mov on were at "
                   f"{[hex(r) for r in seen]}: return those RIPs (at least two)")
    names = {v: k for k, v in labels.items()}
    return "stops: " + " -> ".join(names.get(rip, hex(rip)) for rip in seen[:2]) + \
        (" (the trap was held over the shadowed nop)" if seen[1] == labels["mov_ss_end"]
         else " (a debug exit inside the MOV SS shadow)" if seen[1] == labels["mov_ss_nop"] else "")


def _support(host) -> Support:
    if host.single_step_stops_in_sti_shadow:
        return Support(True, "single-step over `sti` stops at the shadowed instruction")
    return Support(True, "single-step over `sti` stops only after the shadowed instruction "
                         "(the host holds the trap as for MOV SS; sheet, question 1)")


def injected_by_kvm(verdict: Verdict) -> str:
    return injected_once(verdict, "inject_after_sti", _vector(verdict.random("inject_after_sti")))


LAB = Lab(
    number=6, title="Interrupt shadows", minutes=40, folder=lab_folder(__file__),
    teaches="the STI and MOV SS shadows, KVM_SET_GUEST_DEBUG single-stepping, what ready and the "
            "vCPU events report inside a shadow, and where hosts differ",
    requires=(Cap.SET_GUEST_DEBUG, Cap.VCPU_EVENTS),
    support=_support,
    steps=(
        Step("inject_after_sti(): you single-step through `sti; nop`", check_stepped,
             "send Command.STI_NOP, vcpu.set_single_step(True), then each run() is one instruction"),
        Step("you inject task.vector at the first stop that reports ready", check_sti_injection,
             "at each stop read vcpu.kvm_run.ready_for_interrupt_injection (and vcpu.events.interrupt"
             ".shadow); inject only when ready", injected_by_kvm),
        Step("the guest takes it right after the shadowed nop", check_sti_taken,
             "stop single-stepping after the injection and let the guest reach its next sync point "
             "(guest.run_until(StopKind.SYNC))", injected_by_kvm),
        Step("mov_ss_steps(): the debug exits from `mov %ax, %ss` on", check_mov_ss,
             "single-step Command.MOV_SS (IF=1) from the stop at label mov_ss_mov; collect "
             "vcpu.regs.rip at each DebugExit"),
    ),
)
