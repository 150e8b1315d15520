"""Lab 10, MSI, GSI routing and irqfd: an interrupt raised from another thread, with no exit of the vCPU."""

from __future__ import annotations

import dataclasses
import time

from ...core.constants import Cap
from ...core.errors import PyKvmError
from ...core.exits import IoExit
from ...core.vm import Vm
from ...guests import Command, GuestSession
from ...runtime import command_in_thread
from ..framework import Context, Fail, Lab, SendRecord, Step, StudentError, Support, lab_folder
from ..guest_task import booted_cpus
from ..verdict import Verdict, disagree, posts_interrupts

CPUS = 3                 # the destination is APIC ID 1 or 2: a wrong destination field reaches CPU 0 or nobody
CONTROL_S = 0.3          # seconds the checker's control leaves the vCPU halted with no trigger
JOIN_S = 10.0            # seconds the checker waits for its own WAIT_LOG to end once it raised the GSI
WAKE_STATS = ("halt_wakeup", "halt_exits", "signal_exits", "exits")


@dataclasses.dataclass
class MsiIrqfdTask:
    vm: Vm
    cpus: list[GuestSession]       # one session per vCPU; cpus[i] has APIC ID i
    destination: int               # the APIC ID the interrupt must reach
    vector: int
    gsi: int                       # the GSI to route to the MSI (and to put the irqfd on)

    @property
    def target(self) -> GuestSession:
        """The destination vCPU's session."""
        return self.cpus[self.destination]

    def __repr__(self) -> str:
        return (f"MsiIrqfdTask(destination={self.destination}, vector={self.vector:#x}, gsi={self.gsi}, "
                f"cpus=<{len(self.cpus)} long-mode guests, LAPICs enabled, IF=1>)")


def _parameters(rng) -> tuple[int, int, int]:
    """Destination, vector and GSI (drawn by the child for the task, by the runner for the verdict)."""
    vector = rng.randrange(0x30, 0xF0)
    gsi = rng.choice([g for g in range(32, 1000) if g != vector])
    return rng.randrange(1, CPUS), vector, gsi


def _scenario(ctx: Context, body) -> dict:
    """Boot the VM, hand the student a task, run ``body(task)``; the vCPUs' logs afterwards."""
    destination, vector, gsi = _parameters(ctx.random("task"))
    ctx.load()
    with booted_cpus(CPUS) as cpus:
        for cpu in cpus:
            cpu.apic_enable()
            cpu.command(Command.STI)
        task = MsiIrqfdTask(cpus[0].vcpu.vm, cpus, destination, vector, gsi)
        result = body(task)
        result["task"] = task
        result.setdefault("logs", _logs(task))
        return result


def _logs(task: MsiIrqfdTask) -> list[list[tuple[int, int, int]]]:
    return [[(r.vector, r.cpu, r.rip) for r in cpu.log()] for cpu in task.cpus]


def _delivered(task: MsiIrqfdTask, logs: list[list[tuple[int, int, int]]], what: str) -> str:
    """Fail unless exactly one interrupt, ``task.vector`` on ``task.destination``, was logged."""
    taken = [(vector, cpu) for log in logs for vector, cpu, _ in log]
    want = (task.vector, task.destination)
    if taken == [want]:
        return f"CPU {task.destination} took vector {task.vector:#x}"
    if not taken:
        raise Fail(f"{what}: no CPU took any interrupt (the task's destination is APIC ID "
                   f"{task.destination}, vector {task.vector:#x})")
    shown = ", ".join(f"vector {v:#x} on CPU {c}" for v, c in taken)
    raise Fail(f"{what}: the guests logged {shown}; the task's destination is APIC ID {task.destination}, "
               f"vector {task.vector:#x}, once")


def _describe(send: SendRecord) -> str:
    message = send.message
    if message is None:
        return send.kind
    return (f"address {message.address:#x} (destination field, bits 19:12 = {message.destination}), "
            f"data {message.data:#x} (vector field, bits 7:0 = {message.vector:#x}; delivery mode "
            f"{message.delivery_mode})")


# -- step 1: KVM_SIGNAL_MSI ---------------------------------------------------------------------

def _send(ctx: Context) -> dict:
    def body(task: MsiIrqfdTask) -> dict:
        ctx.trace.clear()
        composed = ctx.trace.composed
        ctx.call("send_msi", task)
        composed = ctx.trace.composed - composed
        sends = list(ctx.trace.sends)
        for cpu in task.cpus:                  # an MSI raised while the vCPUs wait at a sync point is
            cpu.command(Command.NOP)           # taken at their next entry
        return {"sends": sends, "composed": composed}
    return ctx.once("send_msi", lambda ctx: _scenario(ctx, body))


def _refuse_compose(function: str, composed: int) -> None:
    if composed:
        raise Fail(f"{function}() let MsiMessage.compose() build the message (directly or through "
                   f"signal_msi(destination=..., vector=...)): write its address and data yourself (msi())")


def check_send(ctx: Context) -> str:
    run = _send(ctx)
    msis = [send for send in run["sends"] if send.kind == "signal_msi"]
    if not msis:
        raise Fail("send_msi() made no KVM_SIGNAL_MSI (task.vm.signal_msi(message))")
    _refuse_compose("send_msi", run["composed"])
    detail = _delivered(run["task"], run["logs"], f"KVM_SIGNAL_MSI with {_describe(msis[0])}")
    return f"{detail}; your message: {_describe(msis[0])}"


# -- step 2: the route --------------------------------------------------------------------------

def _route(ctx: Context) -> dict:
    def body(task: MsiIrqfdTask) -> dict:
        composed = ctx.trace.composed
        ctx.call("route", task)
        composed = ctx.trace.composed - composed
        try:                                   # the checker raises the GSI itself: KVM follows the route
            task.vm.irq_line(task.gsi, 1)
            task.vm.irq_line(task.gsi, 0)
            refused = ""
        except PyKvmError as exc:
            refused = str(exc)
        for cpu in task.cpus:
            cpu.command(Command.NOP)
        return {"refused": refused, "composed": composed}
    return ctx.once("route", lambda ctx: _scenario(ctx, body))


def check_route(ctx: Context) -> str:
    run = _route(ctx)
    task = run["task"]
    _refuse_compose("route", run["composed"])
    if run["refused"]:
        raise Fail(f"after route(), the checker's KVM_IRQ_LINE on GSI {task.gsi} was refused: {run['refused']}")
    detail = _delivered(task, run["logs"], f"the checker raised GSI {task.gsi} (KVM_IRQ_LINE)")
    return f"GSI {task.gsi} raised by the checker: {detail}"


# -- steps 3 and 4: the irqfd wakes the halted vCPU ---------------------------------------------

def _wake(ctx: Context) -> dict:
    def body(task: MsiIrqfdTask) -> dict:
        ctx.call("route", task)
        target = task.target
        stats = target.vcpu.stats       # KVM_GET_STATS_FD needs the vCPU: open it before any thread runs it
        ctx.trace.clear()
        with stats.delta(*WAKE_STATS) as woken:
            ctx.call("wake", task)
        sends, exits, logs = list(ctx.trace.sends), list(ctx.trace.exits), _logs(task)
        log = target.log()
        return {"sends": sends, "exits": exits, "woken": {name: woken[name] for name in WAKE_STATS}, "logs": logs,
                "after_hlt": target.address("wait_log_hlt") + 1, "record": log[-1] if log else None,
                "control": _control(task, stats)}
    return ctx.once("wake", lambda ctx: _scenario(ctx, body))


def _control(task: MsiIrqfdTask, stats) -> dict:
    """The same wait with no trigger: once blocked, the vCPU stays halted CONTROL_S; then the checker raises the GSI.

    Judged by what the guest took (its log, ``irq_injections``), not by ``halt_wakeup``: KVM may wake a
    blocked vCPU with nothing to deliver (measured on kvm_pvm: one such wake, right after an irqfd was
    released), and the vCPU then blocks again without running the guest.
    """
    target = task.target
    count = len(target.log())
    try:
        waiter = command_in_thread(target, Command.WAIT_LOG, count + 1)
        deadline = time.monotonic() + JOIN_S
        while not stats.read()["blocking"] and waiter.running and time.monotonic() < deadline:
            time.sleep(0.001)
        with stats.delta("halt_wakeup", "irq_injections") as quiet:
            time.sleep(CONTROL_S)
            waiting = waiter.running
        logged = len(target.log()) - count
        task.vm.irq_line(task.gsi, 1)
        task.vm.irq_line(task.gsi, 0)
        waiter.result(timeout=JOIN_S)
    except PyKvmError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"error": "", "waiting": waiting, "logged": logged, "halt_wakeup": quiet["halt_wakeup"],
            "injected": quiet["irq_injections"],
            "released": len(target.log()) - count}


def check_irqfd(ctx: Context) -> str:
    run = _wake(ctx)
    task, sends = run["task"], run["sends"]
    direct = [send.kind for send in sends if send.kind != "irqfd"]
    if direct:
        raise Fail(f"wake() raised the interrupt with {direct[0]} (an ioctl of its own), not through an irqfd")
    irqfds = [send for send in sends if send.kind == "irqfd"]
    if not irqfds:
        raise Fail("wake() wrote no irqfd (irqfd.trigger())")
    wrong = sorted({send.gsi for send in irqfds if send.gsi != task.gsi})
    if wrong:
        raise Fail(f"your irqfd raised GSI {wrong[0]}; the task's GSI is {task.gsi}")
    detail = _delivered(task, run["logs"], "after wake()")
    runs = {record.thread for record in run["exits"] if record.vcpu == task.destination}
    if not runs:
        raise Fail(f"vCPU {task.destination} never ran during wake(): nothing waited for the interrupt")
    same = [send for send in irqfds if send.thread in runs]
    if same:
        raise Fail(f"the irqfd was written on the thread that runs vCPU {task.destination}'s KVM_RUN: "
                   f"that thread cannot be waiting in the guest at the same time")
    return f"{detail}; the irqfd on GSI {task.gsi} was written from a thread that does not run the vCPU"


def check_halted(ctx: Context) -> str:
    run = _wake(ctx)
    task, woken, record, control = run["task"], run["woken"], run["record"], run["control"]
    left = [r.kind for r in run["exits"] if r.vcpu == task.destination and not isinstance(r.exit, IoExit)]
    if left:
        raise Fail(f"vCPU {task.destination} left KVM_RUN to userspace with {left[0]} during wake(): "
                   f"the in-kernel LAPIC needs no help from userspace (a kick costs an exit)")
    if record is None or record.rip != run["after_hlt"]:
        where = "nothing" if record is None else f"RIP {record.rip:#x}"
        raise Fail(f"the vector interrupted {where}, not the instruction after WAIT_LOG's hlt "
                   f"({run['after_hlt']:#x}): the vCPU was not halted there when it arrived")
    if not woken["halt_wakeup"]:
        raise Fail(f"halt_wakeup +0 during wake() (halt_exits +{woken['halt_exits']}): KVM never woke vCPU "
                   f"{task.destination} from a halt, so nothing shows the irqfd woke it; the interrupt was "
                   f"already pending when the vCPU reached its hlt, or came after the wait")
    if control["error"]:
        busy = "Busy" in control["error"] or "Thread" in control["error"]
        raise StudentError(f"the checker's control after wake() failed: {control['error']}" +
                           (f" (is a thread of yours still running vCPU {task.destination}? join it before "
                            f"wake() returns)" if busy else ""))
    if not control["waiting"] or control["logged"] or control["injected"]:
        raise Fail(f"control: with no trigger, vCPU {task.destination} did not stay halted for {CONTROL_S:g} s "
                   f"(logged {control['logged']}, irq_injections +{control['injected']}): an interrupt "
                   f"was still pending from wake()")
    if control["released"] != 1:
        raise Fail(f"control: the checker's KVM_IRQ_LINE on GSI {task.gsi} released {control['released']} "
                   f"records instead of 1")
    return (f"halt_wakeup +{woken['halt_wakeup']}, halt_exits +{woken['halt_exits']}, signal_exits "
            f"+{woken['signal_exits']}; the vector interrupted the hlt; control: with no trigger the vCPU "
            f"stayed halted {CONTROL_S:g} s (nothing injected) until the checker raised GSI {task.gsi}")


def _injections(verdict: Verdict, key: str, wanted: int) -> str:
    """KVM's counters: the task's destination vCPU, and no other, had ``wanted`` interrupts injected.

    At least ``wanted``: KVM counts an injection again when an exit interrupts its delivery. Posted
    interrupts (APICv, AVIC) reach a guest without KVM's injection path, which counts
    ``irq_injections``: there the count is not asked for, only that no other vCPU had any.
    """
    destination = _parameters(verdict.random("task"))[0]
    counted = [c["irq_injections"] for c in verdict.counters(key)]
    others = [count for cpu, count in enumerate(counted) if cpu != destination]
    injected = len(counted) == CPUS and counted[destination] >= wanted
    if any(others) or not (injected or (posts_interrupts() and len(counted) == CPUS)):
        raise disagree(f"during {key}() KVM injected {counted} interrupts into vCPUs 0..{CPUS - 1}; the task's "
                       f"destination is {destination}")
    return f"KVM's irq_injections per vCPU: {counted}"


def send_evidence(verdict: Verdict) -> str:
    return _injections(verdict, "send_msi", 1)


def route_evidence(verdict: Verdict) -> str:
    return _injections(verdict, "route", 1)


def wake_evidence(verdict: Verdict) -> str:
    """wake() and the checker's control each injected once."""
    return _injections(verdict, "wake", 2)


def woken_evidence(verdict: Verdict) -> str:
    """As :func:`wake_evidence`, and KVM woke the destination from a halt."""
    detail = wake_evidence(verdict)
    destination = _parameters(verdict.random("task"))[0]
    woken = verdict.counters("wake")[destination]["halt_wakeup"]
    if not woken:
        raise disagree(f"KVM never woke vCPU {destination} from a halt during wake() (halt_wakeup 0)")
    return f"{detail}; halt_wakeup {woken}"


def _support(host) -> Support:
    if host.lapic_delivers_when_unblocked:
        return Support(True, "the in-kernel LAPIC injects as soon as the guest can take the vector")
    return Support(True, "the in-kernel LAPIC injects only at a VM entry: a halted vCPU is woken (and so "
                         "entered) at once, a vCPU at a sync exit takes the MSI at its next run")


LAB = Lab(
    number=10, title="MSI, GSI routing and irqfd", minutes=50, folder=lab_folder(__file__),
    teaches="the MSI address/data format, KVM_SIGNAL_MSI, KVM_SET_GSI_ROUTING to an MSI, and an irqfd "
            "written from another thread waking a vCPU halted inside KVM_RUN, with no exit to userspace",
    requires=(Cap.IRQCHIP, Cap.SIGNAL_MSI, Cap.IRQ_ROUTING, Cap.IRQFD, Cap.BINARY_STATS_FD),
    support=_support,
    steps=(
        Step("your MSI reaches the destination vCPU with the vector (KVM_SIGNAL_MSI)", check_send,
             "an x86 MSI is an address 0xFEExxxxx whose bits 19:12 name the destination APIC ID, and "
             "data whose low byte is the vector (bits 10:8: delivery mode, 0 = fixed)", send_evidence),
        Step("the task's GSI is routed to your MSI (the checker raises it)", check_route,
             "KVM_SET_GSI_ROUTING replaces the whole table: keep vm.routes and add an MsiRoute for the "
             "task's GSI", route_evidence),
        Step("an irqfd on the GSI, written from another thread, delivers the vector", check_irqfd,
             "the vCPU waits inside KVM_RUN on its own thread (command_in_thread); the eventfd write "
             "comes from a different thread", wake_evidence),
        Step("the vCPU was halted in the kernel and the irqfd woke it, with no exit to userspace", check_halted,
             "write the irqfd only once the vCPU is blocked in its hlt: its stats' 'blocking' reads 1 "
             "(open vcpu.stats before the vCPU's thread starts)", woken_evidence),
    ),
)
