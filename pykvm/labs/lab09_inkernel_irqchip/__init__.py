"""Lab 9, The in-kernel irqchip: IOAPIC pins, KVM_IRQ_LINE, edge and level, the EOI and remote IRR.

The student programs IOAPIC redirection entries, pulses an edge-triggered
line, and acknowledges a level-triggered device (lower its line, EOI). The
checker plays the device, runs the guest, and judges the guest's vector log,
the statuses KVM_IRQ_LINE returned and the IOAPIC state KVM reports
(``KVM_GET_IRQCHIP``: redirection entries, line levels, remote IRR).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

from ...core.constants import Cap
from ...core.vm import Vm
from ...guests import Command, GuestSession
from ...irqchip import DeliveryMode, ioapic
from ...irqchip.ioapic import IoapicState, RedirectionEntry
from ..framework import Context, Fail, Lab, Step, Support, lab_folder
from ..guest_task import booted
from ..verdict import Verdict, delivered

PINS = range(16, 24)       # IOAPIC-only GSIs: 0-15 also reach the 8259s


@dataclasses.dataclass
class IoapicTask:
    guest: GuestSession
    pin: int                  # the IOAPIC pin (= GSI) of the device
    vector: int
    level: bool               # True: level-triggered; False: edge-triggered

    @property
    def vm(self) -> Vm:
        return self.guest.vcpu.vm

    def __repr__(self) -> str:
        return (f"IoapicTask(pin={self.pin}, vector={self.vector:#x}, "
                f"{'level' if self.level else 'edge'}-triggered)")


def _draw(rng: random.Random) -> tuple[int, int, int, int]:
    """Two different pins and two vectors of different priority classes."""
    edge_pin, level_pin = rng.sample(PINS, 2)
    edge_vector, level_vector = (rng.randrange(0x3, 0xF) << 4 | rng.randrange(16) for _ in range(2))
    if edge_vector >> 4 == level_vector >> 4:
        level_vector ^= 0x80 if level_vector < 0x80 else 0xC0
    return edge_pin, edge_vector, level_pin, level_vector


def _route_scenario(ctx: Context) -> dict:
    edge_pin, edge_vector, level_pin, level_vector = _draw(ctx.random("route"))
    ctx.load()
    with booted(irqchip="kernel") as guest:
        before = ioapic.read(guest.vcpu.vm)
        tasks = [IoapicTask(guest, edge_pin, edge_vector, False), IoapicTask(guest, level_pin, level_vector, True)]
        for task in tasks:
            ctx.call("route", task)
        return {"tasks": tasks, "before": before, "after": ioapic.read(guest.vcpu.vm)}


def check_route(ctx: Context) -> str:
    run = ctx.once("route", _route_scenario)
    state: IoapicState = run["after"]
    done = []
    for task in run["tasks"]:
        entry = state.redirection[task.pin]
        want = RedirectionEntry(vector=task.vector, level_triggered=task.level, destination=0)
        problems = []
        if entry.vector != task.vector:
            problems.append(f"vector {entry.vector:#x}, not {task.vector:#x}")
        if entry.level_triggered != task.level:
            problems.append(f"trigger mode {'level' if entry.level_triggered else 'edge'}, not "
                            f"{'level' if task.level else 'edge'}")
        if entry.masked:
            problems.append("masked")
        if (entry.delivery_mode, entry.logical, entry.destination) != \
                (want.delivery_mode, want.logical, want.destination):
            problems.append(f"delivery {DeliveryMode(entry.delivery_mode).name} "
                            f"{'logical' if entry.logical else 'physical'} to {entry.destination}, "
                            f"not FIXED physical to APIC ID 0")
        if problems:
            changed = [pin for pin in PINS if state.redirection[pin] != run["before"].redirection[pin]]
            raise Fail(f"KVM's IOAPIC pin {task.pin} ({task!r}): " + "; ".join(problems) +
                       f" (pins you changed: {changed or 'none'})")
        done.append(f"pin {task.pin} -> {task.vector:#x} {'level' if task.level else 'edge'}")
    return "; ".join(done)


def _draw_task(rng: random.Random, level: bool) -> tuple[int, int, int]:
    """How many times, which pin, which vector (drawn by the child for the task, by the runner for the verdict)."""
    edge_pin, edge_vector, level_pin, level_vector = _draw(rng)
    pin, vector = (level_pin, level_vector) if level else (edge_pin, edge_vector)
    return rng.randrange(2, 5), pin, vector


def _pulse_scenario(ctx: Context) -> dict:
    count, pin, vector = _draw_task(ctx.random("pulse"), False)
    ctx.load()
    with booted(irqchip="kernel") as guest:
        guest.apic_enable(auto_eoi=True)          # the handler EOIs: this part is about the line only
        guest.ioapic_route(pin, RedirectionEntry(vector=vector))
        guest.command(Command.STI)
        task = IoapicTask(guest, pin, vector, False)
        rounds = []
        for _ in range(count):
            sends = len(ctx.trace.sends)
            seen = len(guest.log())
            ctx.call("pulse", task)
            guest.command(Command.NOP)
            rounds.append({"new": [r.vector for r in guest.log()[seen:seen + 8]],
                           "lines": [s.level for s in ctx.trace.sends[sends:] if s.kind == "irq_line"
                                     and s.gsi == pin]})
        return {"task": task, "count": count, "rounds": rounds, "other_lines": sorted(
            {s.gsi for s in ctx.trace.sends if s.kind == "irq_line" and s.gsi != pin})}


def check_pulse(ctx: Context) -> str:
    run = ctx.once("pulse", _pulse_scenario)
    task = run["task"]
    if run["other_lines"]:
        raise Fail(f"pulse() moved GSIs {run['other_lines']}; task.pin is {task.pin}")
    for number, round_ in enumerate(run["rounds"], 1):
        if round_["new"] != [task.vector]:
            lines = round_["lines"]
            why = (f"; your KVM_IRQ_LINE levels this time: {lines}" if lines else
                   "; pulse() made no KVM_IRQ_LINE call for task.pin")
            raise Fail(f"pulse #{number}: the guest took {[hex(v) for v in round_['new']]}, not "
                       f"[{task.vector:#x}] once{why}")
    return f"{run['count']} edges on pin {task.pin}, each taken once as {task.vector:#x}"


def _acknowledge_scenario(ctx: Context) -> dict:
    count, pin, vector = _draw_task(ctx.random("acknowledge"), True)
    ctx.load()
    with booted(irqchip="kernel") as guest:
        vm = guest.vcpu.vm
        guest.apic_enable(auto_eoi=False)         # the handler does not EOI: that is acknowledge()'s job
        guest.ioapic_route(pin, RedirectionEntry(vector=vector, level_triggered=True))
        guest.command(Command.STI)
        task = IoapicTask(guest, pin, vector, True)
        rounds = []
        for _ in range(count):
            seen = len(guest.log())
            status = vm.irq_line(pin, 1)          # the device asks for service: its line goes high
            guest.command(Command.NOP)
            taken = len(guest.log()) - seen
            raised = ioapic.read(vm).redirection[pin].remote_irr
            ctx.call("acknowledge", task)
            state = ioapic.read(vm)
            after = len(guest.log())
            guest.command(Command.NOP)            # would the IOAPIC deliver it again?
            rounds.append({"status": status, "taken": taken, "remote_irr_at_delivery": raised,
                           "line": pin in state.irr, "remote_irr": state.redirection[pin].remote_irr,
                           "again": len(guest.log()) - after,
                           "vectors": {r.vector for r in guest.log()[seen:seen + 16]}})
        return {"task": task, "rounds": rounds}


def check_acknowledged(ctx: Context) -> str:
    run = ctx.once("acknowledge", _acknowledge_scenario)
    task = run["task"]
    for number, round_ in enumerate(run["rounds"], 1):
        if round_["line"] and round_["remote_irr"]:
            raise Fail(f"request #{number}: after acknowledge() the line of pin {task.pin} was still high, and "
                       f"remote IRR set again: your EOI re-armed the pin, the IOAPIC saw the line high and "
                       f"delivered {task.vector:#x} once more")
        if round_["line"]:
            raise Fail(f"request #{number}: after acknowledge() the line of pin {task.pin} was still high")
        if round_["remote_irr"]:
            raise Fail(f"request #{number}: after acknowledge() pin {task.pin}'s remote IRR was still set: "
                       f"no EOI reached the IOAPIC, or one came while the line was still high and the "
                       f"IOAPIC delivered again; until an EOI it will not deliver this pin")
    return f"{len(run['rounds'])} requests: line low and remote IRR clear after each acknowledge()"


def check_level_deliveries(ctx: Context) -> str:
    run = ctx.once("acknowledge", _acknowledge_scenario)
    task = run["task"]
    exact = ctx.host.lapic_tracks_in_service
    for number, round_ in enumerate(run["rounds"], 1):
        if round_["status"] is not None and round_["status"] <= 0:
            raise Fail(f"request #{number}: KVM_IRQ_LINE returned {round_['status']} (not delivered: "
                       f"{'coalesced' if round_['status'] < 0 else 'masked'}) when the device raised its line")
        if not round_["remote_irr_at_delivery"] or not round_["taken"]:
            raise Fail(f"request #{number}: the guest took {task.vector:#x} {round_['taken']} times "
                       f"(remote IRR {int(round_['remote_irr_at_delivery'])})")
        if round_["vectors"] != {task.vector}:
            raise Fail(f"request #{number}: the guest also took {sorted(hex(v) for v in round_['vectors'])}")
        if exact and (round_["taken"], round_["again"]) != (1, 0):
            raise Fail(f"request #{number}: the guest took {task.vector:#x} {round_['taken']} time(s) before "
                       f"acknowledge() and {round_['again']} after it; once, and never again, is right")
    if exact:
        return f"each of {len(run['rounds'])} requests delivered once (KVM_IRQ_LINE status 1), none after"
    return (f"each of {len(run['rounds'])} requests delivered (KVM_IRQ_LINE status 1); this host's LAPIC keeps "
            f"nothing in service, so the vector is taken again at VM entries until the EOI (sheet)")


def _support(host) -> Support:
    if host.lapic_tracks_in_service:
        return Support(True, "a level vector is taken once per request")
    return Support(True, "this host's LAPIC keeps nothing in service: an un-EOId level vector is taken "
                         "again at each VM entry (the IOAPIC's state is the same as elsewhere)")


def deliveries(key: str) -> Callable[[Verdict], str]:
    """A step's rule: KVM injected every one of scenario ``key``'s random number of requests."""
    def rule(verdict: Verdict) -> str:
        count = _draw_task(verdict.random(key), key == "acknowledge")[0]
        return f"KVM's irq_injections: {delivered(verdict, key, count)}"
    return rule


LAB = Lab(
    number=9, title="The in-kernel irqchip", minutes=50, folder=lab_folder(__file__),
    teaches="KVM's 8259 PICs and IOAPIC, GSIs and KVM_IRQ_LINE, redirection entries, edge vs level "
            "triggering, the EOI and the IOAPIC's remote IRR",
    requires=(Cap.IRQCHIP,),
    support=_support,
    steps=(
        Step("route(): KVM's IOAPIC holds the redirection entries asked for", check_route,
             "a redirection entry holds vector, delivery mode, destination, trigger mode and mask "
             "(pykvm.irqchip.ioapic.RedirectionEntry); the guest writes it (task.guest.ioapic_route) "
             "or the host does (ioapic.read / with_entry / write)"),
        Step("pulse(): every edge is taken exactly once", check_pulse,
             "an edge-triggered pin fires when its line goes from low to high: what must happen "
             "between two edges? (vm.irq_line(gsi, level))", deliveries("pulse")),
        Step("acknowledge(): the line is low and remote IRR clear afterwards", check_acknowledged,
             "a level-triggered pin delivers while its line is high and then waits with remote IRR "
             "set; the device's line and the LAPIC's EOI are two different things (sheet, 'Level')",
             deliveries("acknowledge")),
        Step("every level request is delivered, and not again after acknowledge()", check_level_deliveries,
             "the order matters: an EOI that comes while the line is still high makes the IOAPIC "
             "deliver again", deliveries("acknowledge")),
    ),
)
