"""Lab 2, The real-mode IVT: a handler of your own, KVM_INTERRUPT, and the frame it sees."""

from __future__ import annotations

import dataclasses

from ...core.constants import Cap
from ...core.errors import AssemblerError
from ...core.exits import HltExit
from ...core.system import Kvm
from ...core.vcpu import Vcpu
from ...core.vm import Vm
from ...x86.asm import assemble
from ...x86.modes import enter_real_mode
from ...x86.system_area import DEFAULT_STACK_TOP
from ..framework import Context, Fail, Lab, Step, Support, lab_folder
from ..verdict import Verdict, disagree, injected_once

MAIN = 0x8000                  # linear address of the main program (CS = 0x800, IP = 0)
STUBS = 0x9000                 # the checker's default handlers, one per vector
STRAY_PORT = 0xF1

MAIN_SOURCE = """
start:  sti
        mov $TICKS, %cx
tick:   mov %cx, %ax
        out %ax, $TICK_PORT     # one tick per iteration: an IO exit each time
after_out:
        loop tick
        mov %sp, %ax
        out %ax, $DONE_PORT     # report SP: as it started if every handler returned properly
        hlt
end:
"""


def _stubs_source() -> str:
    # a default handler per vector: report the vector on STRAY_PORT and halt
    return "\n".join(f"stub_{v}: mov ${v}, %al\n out %al, ${STRAY_PORT}\n hlt" for v in range(256))


@dataclasses.dataclass
class RealModeIvtTask:
    """What solve() gets: a VM whose vCPU sits in real mode at the main program, and what to do."""

    kvm: Kvm
    vm: Vm
    vcpu: Vcpu
    vector: int                  # install your handler for this vector and inject it, once
    handler_address: int         # linear address (a multiple of 16) to load your handler at
    report_port: int             # your handler reports the interrupted IP with `out %ax, $report_port`
    tick_port: int               # the main program's ticks
    done_port: int               # the main program's final report (its SP)

    def __repr__(self) -> str:
        return (f"RealModeIvtTask(vector={self.vector:#x}, handler_address={self.handler_address:#x}, "
                f"report_port={self.report_port:#x}, tick_port={self.tick_port:#x}, "
                f"done_port={self.done_port:#x})")


@dataclasses.dataclass(frozen=True)
class _Draw:
    """A run's random parameters (drawn by the child for the task, by the runner for the verdict)."""

    ports: list[int]            # tick, done, report
    ticks: int
    vector: int
    handler_address: int


def _draw(rng) -> _Draw:
    ports = rng.sample(range(0x40, 0xE0), 3)
    ticks = rng.randrange(3, 7)
    return _Draw(ports, ticks, rng.randrange(0x20, 0x100), rng.randrange(0x20, 0x30) << 12)


def _scenario(ctx: Context) -> dict:
    draw = _draw(ctx.random("solve"))
    ports, ticks = draw.ports, draw.ticks
    main = assemble(MAIN_SOURCE, "real", 0, {"TICKS": ticks, "TICK_PORT": ports[0], "DONE_PORT": ports[1]})
    stubs = assemble(_stubs_source(), "real", 0)
    ctx.load()
    ctx.trace.clear()
    kvm = Kvm()
    vm = kvm.create_vm()
    try:
        vm.memory.write(MAIN, main.code)
        vm.memory.write(STUBS, stubs.code)
        for vector in range(256):         # every IVT entry: segment STUBS>>4, offset of its stub
            vm.memory.write_u16(4 * vector, stubs.symbols[f"stub_{vector}"])
            vm.memory.write_u16(4 * vector + 2, STUBS >> 4)
        vcpu = vm.create_vcpu()
        enter_real_mode(vcpu, 0, cs=MAIN >> 4)
        task = RealModeIvtTask(kvm, vm, vcpu, draw.vector, draw.handler_address, ports[2], ports[0], ports[1])
        source = ctx.call("handler_source", task)
        if not isinstance(source, str):
            raise Fail(f"handler_source() returned {type(source).__name__}, not assembly text (a str)")
        try:
            handler = assemble(source, "real", 0)
        except AssemblerError as exc:
            raise Fail(f"your handler does not assemble: {str(exc).splitlines()[0]}") from None
        ctx.call("solve", task)
        ivt = (vm.memory.read_u16(4 * task.vector + 2), vm.memory.read_u16(4 * task.vector))
        return {"task": task, "ticks": ticks, "main": main.symbols, "handler_size": len(handler.code),
                "ivt": ivt}
    finally:
        vm.close()
        kvm.close()


def _run(ctx: Context) -> dict:
    return ctx.once("solve", _scenario)


def check_ivt(ctx: Context) -> str:
    run = _run(ctx)
    task = run["task"]
    segment, offset = run["ivt"]
    linear = segment * 16 + offset
    if segment == STUBS >> 4:
        raise Fail(f"IVT entry {task.vector:#x} (at address {4 * task.vector:#x}) still points at the "
                   f"checker's default handler {segment:#x}:{offset:#x}")
    if not task.handler_address <= linear < task.handler_address + run["handler_size"]:
        raise Fail(f"IVT entry {task.vector:#x} holds {segment:#x}:{offset:#x} = linear {linear:#x}, "
                   f"outside your handler at {task.handler_address:#x}")
    return f"IVT[{task.vector:#x}] = {segment:#06x}:{offset:#06x} (linear {linear:#x})"


def check_injection(ctx: Context) -> str:
    task = _run(ctx)["task"]
    injections = [i for i in ctx.trace.injections if i.kind == "interrupt"]
    if not injections:
        raise Fail("solve() never called vcpu.interrupt()")
    wrong = [i for i in injections if i.vector != task.vector]
    if wrong:
        raise Fail(f"you injected vector {wrong[0].vector:#x}; this run's task.vector is {task.vector:#x}")
    if len(injections) > 1:
        raise Fail(f"you injected {len(injections)} times; the task asks for one interrupt")
    if not injections[0].ready or injections[0].forced:
        raise Fail("you injected while the last exit reported ready_for_interrupt_injection=0")
    return f"KVM_INTERRUPT {task.vector:#x} after exit {injections[0].after_exits}, guest ready"


def check_report(ctx: Context) -> str:
    run = _run(ctx)
    task = run["task"]
    exits = ctx.trace.exits
    reports = [r for r in exits if r.port == task.report_port]
    if not reports:
        stray = [r for r in exits if r.port == STRAY_PORT]
        if stray:
            raise Fail(f"vector {stray[0].value:#x} reached the checker's default handler, not yours")
        raise Fail(f"no exit for an OUT to task.report_port={task.report_port:#x}: your handler never "
                   f"reported (did it run? is the port right?)")
    report = reports[0]
    if not task.handler_address <= report.linear_rip <= task.handler_address + run["handler_size"]:
        raise Fail(f"the report came from linear {report.linear_rip:#x}, not from your handler")
    expected = run["main"]["after_out"]
    if report.value != expected:
        raise Fail(f"your handler reported IP {report.value:#x}; the interrupted IP (the "
                   f"instruction after the tick's `out`) is {expected:#x}",
                   "the CPU pushed FLAGS, CS and IP, in that order, on SS:SP before jumping to your "
                   "handler; which of them is at the lowest address? (sheet, 'The frame')")
    return f"interrupted IP {expected:#x}, reported from linear {report.linear_rip:#x}"


def check_return(ctx: Context) -> str:
    run = _run(ctx)
    task = run["task"]
    exits = ctx.trace.exits
    ticks = [r for r in exits if r.port == task.tick_port]
    done = [r for r in exits if r.port == task.done_port]
    if not done:
        last = exits[-1] if exits else None
        stray = [r.value for r in exits if r.port == STRAY_PORT]
        raise Fail(f"the main program never finished its loop ({len(ticks)} of {run['ticks']} ticks); "
                   + (f"after your handler the guest took vector {stray[0]:#x} (an exception: it ran "
                      f"on with a broken stack or FLAGS)" if stray else
                      f"last exit: {last.exit if last else 'none'}"))
    sp = done[0].value
    if sp != DEFAULT_STACK_TOP:
        left = DEFAULT_STACK_TOP - sp
        raise Fail(f"the main program ended with SP={sp:#x}, not {DEFAULT_STACK_TOP:#x}: " +
                   (f"{left} bytes of the interrupt's frame were never popped" if 0 < left <= 6 else
                    "after your handler the stack was no longer the one the CPU interrupted"))
    if not done[0].rflags & 0x200:
        raise Fail("after your handler the main program ran with IF=0: the FLAGS the CPU saved "
                   "were never restored")
    if len(ticks) != run["ticks"] or not any(isinstance(r.exit, HltExit) for r in exits):
        raise Fail(f"the main program made {len(ticks)} ticks, not {run['ticks']}, or never halted")
    return f"{len(ticks)} ticks, SP back to {sp:#x}, IF=1, halted"


def injected_by_kvm(verdict: Verdict) -> str:
    return injected_once(verdict, "solve", _draw(verdict.random("solve")).vector)


def finished_by_kvm(verdict: Verdict) -> str:
    """As :func:`injected_by_kvm`, and the main program's ticks, report, final OUT and hlt were exits KVM counted."""
    detail = injected_by_kvm(verdict)
    ticks = _draw(verdict.random("solve")).ticks
    counters = verdict.counters("solve")[0]
    if counters["exits"] < ticks + 3 or counters["halt_exits"] < 1:
        raise disagree(f"KVM counted {counters['exits']} exits, {counters['halt_exits']} at a hlt; {ticks} "
                       f"ticks, the handler's report, the final OUT and the hlt are at least {ticks + 3}, one a hlt")
    return f"{detail}; KVM counted {counters['exits']} exits"


LAB = Lab(
    number=2, title="The real-mode IVT", minutes=45, folder=lab_folder(__file__),
    teaches="the interrupt vector table, a handler in 16-bit assembly, KVM_INTERRUPT when ready, "
            "the FLAGS/CS/IP frame and IRET",
    requires=(Cap.USER_MEMORY,),
    support=lambda host: Support(True, "" if host.io_exit_rip_at_out else
                                 "RIP is reported past the `out` at OUT exits (sheet question 2)"),
    steps=(
        Step("IVT entry task.vector points at your handler", check_ivt,
             "an IVT entry is 4 bytes at address 4 * vector: the offset (16 bits), then the segment "
             "(16 bits); the CPU jumps to segment*16 + offset (sheet, 'The IVT')"),
        Step("you inject task.vector once, when the guest is ready", check_injection,
             "look at vcpu.kvm_run.ready_for_interrupt_injection after each exit; inject only when it "
             "is 1, and only task.vector (it changes on every run)", injected_by_kvm),
        Step("your handler reports the interrupted IP", check_report,
             "in the handler, the frame the CPU pushed is at SS:SP; reach it through BP "
             "(sheet, 'The frame')", injected_by_kvm),
        Step("the handler returns with IRET and the main program finishes", check_return,
             "a handler must leave the stack and FLAGS as the CPU found them: which instruction pops "
             "IP, CS and FLAGS together?", finished_by_kvm),
    ),
)
