"""Lab 3, Protected and long mode: an IDT of your own, and the exceptions a guest raises itself."""

from __future__ import annotations

import dataclasses

from ...core.constants import Cap
from ...core.errors import AssemblerError
from ...core.exits import HltExit
from ...core.system import Kvm
from ...core.vcpu import Vcpu
from ...core.vm import Vm
from ...x86.asm import assemble
from ...x86.system_area import DEFAULT_STACK_TOP, FREE_MEMORY
from ..framework import Context, Fail, Lab, Step, Support, lab_folder

MAIN_SOURCE = """
start:
        lea de_resume(%rip), %rsi   # where each handler must resume the guest
        xor %edx, %edx
        mov $1, %eax
        xor %ecx, %ecx
de_insn:
        div %ecx                    # #DE: divide by zero
de_resume:
        lea gp_resume(%rip), %rsi
        mov $SELECTOR, %ax
gp_insn:
        mov %ax, %ds                # #GP: a selector beyond the GDT's limit
gp_resume:
        lea pf_resume(%rip), %rsi
        movabs $PF_ADDRESS, %rdi
pf_insn:
        ACCESS                      # #PF: nothing is mapped above 4 GiB
pf_resume:
        mov %rsp, %rax
        out %eax, $DONE_PORT        # report RSP: as it started if every handler balanced the stack
        hlt
"""
VECTORS = {0: "de", 13: "gp", 14: "pf"}


@dataclasses.dataclass
class IdtTask:
    """A VM with the checker's program in memory at task.entry; the vCPU has not been set up."""

    kvm: Kvm
    vm: Vm
    vcpu: Vcpu
    entry: int                    # the program's first instruction (long mode, linear)
    handler_address: int          # where your handlers' code goes
    report_port: int              # each handler reports with `out %al, $report_port`
    done_port: int

    def __repr__(self) -> str:
        return (f"IdtTask(entry={self.entry:#x}, handler_address={self.handler_address:#x}, "
                f"report_port={self.report_port:#x}, done_port={self.done_port:#x})")


def _scenario(ctx: Context) -> dict:
    rng = ctx.random("solve")
    selector = rng.randrange(32, 0x1000) << 3 | rng.randrange(4)
    pf_address = rng.randrange(0x10, 0x7FFF) << 32 | rng.getrandbits(32)
    write = rng.random() < 0.5
    report_port, done_port = rng.sample(range(0x40, 0xE0), 2)
    main = assemble(MAIN_SOURCE.replace("ACCESS", "mov %rax, (%rdi)" if write else "mov (%rdi), %rax"),
                    "long", FREE_MEMORY, {"SELECTOR": selector, "PF_ADDRESS": pf_address,
                                          "DONE_PORT": done_port})
    ctx.load()
    ctx.trace.clear()
    kvm = Kvm()
    vm = kvm.create_vm()
    try:
        vm.memory.write(FREE_MEMORY, main.code)
        vcpu = vm.create_vcpu()
        task = IdtTask(kvm, vm, vcpu, main.symbols["start"], rng.randrange(0x20, 0x40) << 12,
                    report_port, done_port)
        source = ctx.call("handlers_source", task)
        if not isinstance(source, str):
            raise Fail(f"handlers_source() returned {type(source).__name__}, not assembly text")
        try:
            handlers = assemble(source, "long", task.handler_address)
        except AssemblerError as exc:
            raise Fail(f"your handlers do not assemble: {str(exc).splitlines()[0]}") from None
        ctx.call("solve", task)
        sregs = vcpu.sregs
        idt = vm.memory.read(sregs.idt.base, min(sregs.idt.limit + 1, 256 * 16))
        return {"task": task, "main": main.symbols, "size": len(handlers.code), "idt": idt,
                "long": bool(sregs.efer & 0x400), "expected": {
                    0: (None, main.symbols["de_insn"], None),
                    13: (selector & 0xFFF8, main.symbols["gp_insn"], None),
                    14: (2 if write else 0, main.symbols["pf_insn"], pf_address)}}
    finally:
        vm.close()
        kvm.close()


def _run(ctx: Context) -> dict:
    return ctx.once("solve", _scenario)


def _gate(idt: bytes, vector: int) -> tuple[bool, int]:
    raw = idt[16 * vector:16 * vector + 16]
    if len(raw) < 16:
        return False, 0
    offset = (int.from_bytes(raw[0:2], "little") | int.from_bytes(raw[6:8], "little") << 16
              | int.from_bytes(raw[8:12], "little") << 32)
    return bool(raw[5] & 0x80), offset


def check_idt(ctx: Context) -> str:
    run = _run(ctx)
    task = run["task"]
    if not run["long"]:
        raise Fail("the vCPU was not in long mode when solve() returned (EFER.LMA=0)")
    found = []
    for vector, name in VECTORS.items():
        present, offset = _gate(run["idt"], vector)
        if not present or not task.handler_address <= offset < task.handler_address + run["size"]:
            raise Fail(f"IDT gate {vector} ({name.upper()}) is {'present' if present else 'not present'}"
                       f" with offset {offset:#x}, not inside your handlers at {task.handler_address:#x}")
        found.append(f"{vector}->{offset:#x}")
    return "gates " + ", ".join(found)


def _reports(ctx: Context, run: dict) -> list:
    task = run["task"]
    return [r for r in ctx.trace.exits if r.port == task.report_port]


def _check_vector(vector: int):
    name = VECTORS[vector].upper()

    def check(ctx: Context) -> str:
        run = _run(ctx)
        error_code, rip, cr2 = run["expected"][vector]
        reports = [r for r in _reports(ctx, run) if r.value == vector]
        if not reports:
            seen = _summary([r.value for r in _reports(ctx, run)])
            raise Fail(f"no report with AL={vector} (#{name}); the reports had AL = {seen}"
                       f"; the exits: {', '.join(r.kind for r in ctx.trace.exits[:8])}")
        report = reports[0]
        problems = []
        if report.rcx != rip:
            problems.append(f"RCX={report.rcx:#x}, but the faulting instruction is at {rip:#x}")
        if (report.rbx & 0xFFFFFFFF) != (error_code or 0):
            problems.append(f"RBX={report.rbx:#x}, but the error code is "
                            f"{'none (report 0)' if error_code is None else hex(error_code)}")
        if cr2 is not None and report.rdx != cr2:
            problems.append(f"RDX={report.rdx:#x}, but CR2 holds {cr2:#x}")
        if problems:
            raise Fail(f"#{name} report: " + "; ".join(problems))
        return (f"#{name} at {rip:#x}" + (f", error code {error_code:#x}" if error_code is not None else "")
                + (f", CR2 {cr2:#x}" if cr2 is not None else ""))
    return check


def check_resumed(ctx: Context) -> str:
    run = _run(ctx)
    task = run["task"]
    reports = [r.value for r in _reports(ctx, run)]
    done = [r for r in ctx.trace.exits if r.port == task.done_port]
    if reports != [0, 13, 14]:
        raise Fail(f"the reports came as vectors {_summary(reports)}, not [0, 13, 14] once each: a handler did not "
                   f"resume the guest at RSI" + _last(ctx))
    if not done or not any(isinstance(r.exit, HltExit) for r in ctx.trace.exits):
        raise Fail("the program did not reach its end after the #PF" + _last(ctx))
    if (done[0].value & 0xFFFFFFFF) != DEFAULT_STACK_TOP:
        raise Fail(f"the program ended with RSP={done[0].value:#x}, not {DEFAULT_STACK_TOP:#x}")
    return "resumed after each fault; RSP balanced; halted"


def _summary(values: list[int]) -> str:
    """``0, 13 x99``: the values in order, repeats counted."""
    runs: list[list[int]] = []
    for value in values:
        if runs and runs[-1][0] == value:
            runs[-1][1] += 1
        else:
            runs.append([value, 1])
    return ", ".join(f"{v}" + (f" x{n}" if n > 1 else "") for v, n in runs) or "nothing"


def _last(ctx: Context) -> str:
    exits = ctx.trace.exits
    return f" (last exit: {exits[-1].exit!r} at RIP {exits[-1].rip:#x})" if exits else ""


def _support(host) -> Support:
    if host.protected_mode_iret:
        return Support(True)
    return Support(False, "the protected-mode question stops at the handler's IRET "
                          "(KVM_EXIT_INTERNAL_ERROR: this host cannot emulate it); long mode runs fully")


FRAME_HINT = ("at entry RSP points at the frame the CPU pushed; for #GP and #PF the error code "
              "comes first (sheet, 'Frames'); CR2 is read with `mov %cr2, %rdx`")

LAB = Lab(
    number=3, title="Protected and long mode: exceptions", minutes=60, folder=lab_folder(__file__),
    teaches="the IDT and its gates, exception frames with and without an error code, #DE, #GP, "
            "#PF and CR2, resuming after a fault with IRETQ",
    requires=(Cap.USER_MEMORY,),
    support=_support,
    steps=(
        Step("long mode, with IDT gates 0, 13 and 14 on your handlers", check_idt,
             "pykvm.x86.enter_long_mode(vcpu, rip, handlers={vector: address}) writes the IDT; "
             "the addresses are your labels' (assemble at task.handler_address)"),
        Step("#DE: your handler reports vector, RIP", _check_vector(0), FRAME_HINT),
        Step("#GP: your handler reports vector, error code, RIP", _check_vector(13), FRAME_HINT),
        Step("#PF: your handler reports vector, error code, RIP, CR2", _check_vector(14), FRAME_HINT),
        Step("every handler resumes the guest at RSI with IRETQ", check_resumed,
             "IRETQ pops RIP, CS, RFLAGS, RSP, SS: the error code must be gone from the stack first, "
             "and the saved RIP replaced with RSI"),
    ),
)
