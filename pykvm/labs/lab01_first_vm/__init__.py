"""Lab 1, First VM: /dev/kvm, a memory slot, a vCPU, KVM_RUN, and answering a port IN."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ...core.constants import Cap, IoDirection
from ...core.exits import HltExit, IoExit
from ...x86.asm import assemble
from ..framework import Context, Fail, Lab, Step, Support, lab_folder
from ..verdict import Verdict, disagree

STATS = ("exits", "io_exits", "halt_exits")

GUEST = """
start:  mov $PORT, %dx
in_insn:
        in (%dx), %eax          # ask the host for a value
        xor $KEY, %eax          # scramble it with a key the host does not tell you
        mov %eax, %ebx
        inc %dx
        out %ax, (%dx)          # report its low 16 bits on PORT+1
        hlt
end:
"""


@dataclasses.dataclass(frozen=True)
class FirstVmTask:
    """What solve() gets: the guest's code, where to put it, the port it reads and what to answer."""

    code: bytes                  # real-mode machine code (assembled from the sheet's listing)
    address: int                 # guest-physical address to load it at (a multiple of 16)
    memory_size: int             # bytes of RAM: one slot at guest-physical 0
    port: int                    # the guest executes `in (%dx), %eax` with DX = port
    answer: int                  # the 32-bit value your IN reply must give the guest

    def __repr__(self) -> str:
        return (f"FirstVmTask(code=<{len(self.code)} bytes>, address={self.address:#x}, "
                f"memory_size={self.memory_size:#x}, port={self.port:#x}, answer={self.answer:#x})")


def _scenario(ctx: Context) -> dict:
    rng = ctx.random("solve")
    port = rng.randrange(0x200, 0x3F0, 2)
    key = rng.getrandbits(32) | 1
    code = assemble(GUEST, "real", 0, {"PORT": port, "KEY": key})
    task = FirstVmTask(code.code, rng.randrange(0x10, 0x80) << 12, rng.choice([1, 2, 4]) << 20, port,
                rng.getrandbits(32))
    ctx.trace.clear()
    ctx.trace.stats_names = STATS
    ctx.load()
    ctx.call("solve", task)
    return {"task": task, "key": key, "symbols": code.symbols}


def _run(ctx: Context) -> dict:
    return ctx.once("solve", _scenario)


def _exits(ctx: Context) -> list:
    _run(ctx)
    if not ctx.trace.vcpus:
        raise Fail("solve() returned without creating a vCPU")
    return [record for record in ctx.trace.exits if record.vcpu == ctx.trace.vcpus[0].id] or []


def check_vm(ctx: Context) -> str:
    run = _run(ctx)
    task = run["task"]
    if not ctx.trace.vcpus:
        raise Fail("solve() returned without creating a vCPU (vm.create_vcpu())")
    vcpu = ctx.trace.vcpus[0]
    slots = ctx.trace.slots.get(id(vcpu))
    if slots is None:
        raise Fail("a vCPU was created but never ran (no KVM_RUN: vcpu.run())")
    wanted = [s for s in slots if s.guest_phys_addr == 0 and s.size == task.memory_size]
    if len(slots) != 1 or not wanted:
        raise Fail(f"the VM's memory slots were {list(slots)}; the task asked for exactly one slot "
                   f"of task.memory_size={task.memory_size:#x} bytes at guest-physical 0")
    return f"one slot {slots[0]!r}, vCPU {vcpu.id}"


def check_first_exit(ctx: Context) -> str:
    run = _run(ctx)
    task = run["task"]
    exits = _exits(ctx)
    if not exits:
        raise Fail("the vCPU never exited to userspace: was run() called?")
    first = exits[0]
    if isinstance(first.exit, IoExit) and first.exit.port == task.port \
            and first.exit.direction == IoDirection.IN:
        return f"first exit: IN from port {task.port:#x}, {first.exit.size} bytes, RIP {first.rip:#x}"
    raise Fail(f"the first exit was {first.exit!r} at linear address {first.linear_rip:#x}, not the "
               f"guest's IN from port {task.port:#x}: the CPU did not start on the guest's first "
               f"instruction at {task.address:#x}")


def check_answer(ctx: Context) -> str:
    run = _run(ctx)
    task, key = run["task"], run["key"]
    outs = [r for r in _exits(ctx) if r.port == task.port + 1]
    if not outs:
        raise Fail(f"the guest never reached its report (an OUT to port {task.port + 1:#x}); "
                   f"the exits were: {', '.join(r.kind for r in _exits(ctx)) or 'none'}")
    got = (outs[0].value ^ key) & 0xFFFF
    if got == task.answer & 0xFFFF:
        return f"the guest read {task.answer:#x} and reported {outs[0].value:#x}"
    if got == 0 and task.answer & 0xFFFF:
        raise Fail("the guest's IN read 0: nothing was written into the IN's data before the next "
                   "KVM_RUN completed the instruction")
    raise Fail(f"the guest's IN read ....{got:04x} (low 16 bits), but task.answer was {task.answer:#x}")


def check_hlt(ctx: Context) -> str:
    run = _run(ctx)
    task, key, symbols = run["task"], run["key"], run["symbols"]
    exits = _exits(ctx)
    halts = [r for r in exits if isinstance(r.exit, HltExit)]
    if not halts:
        last = exits[-1] if exits else None
        raise Fail("the vCPU never reported KVM_EXIT_HLT" +
                   (f"; its last exit was {last.exit!r}" if last else ""))
    halt = halts[0]
    if halt.linear_rip != task.address + symbols["end"]:
        raise Fail(f"KVM_EXIT_HLT at linear {halt.linear_rip:#x}, not after the guest's hlt "
                   f"({task.address + symbols['end']:#x})")
    if (halt.rbx & 0xFFFFFFFF) != task.answer ^ key:
        raise Fail(f"at the hlt KVM reports EBX={halt.rbx & 0xFFFFFFFF:#x}; had the guest read task.answer, "
                   f"EBX would be {task.answer ^ key:#x} (if step 3 failed, this follows from it)")
    stats = halt.stats or {}
    seen = exits.index(halt) + 1
    if stats.get("exits", seen) < seen or stats.get("halt_exits", 1) < 1:
        raise Fail(f"KVM's counters at the hlt ({stats}) count fewer exits than the {seen} you saw")
    return (f"KVM_EXIT_HLT at CS:IP {task.address >> 4:#x}:{halt.rip:#x}, EBX={halt.rbx & 0xFFFFFFFF:#x}; "
            f"KVM's counters: " + ", ".join(f"{name}={value}" for name, value in stats.items()))


def counted_by_kvm(exits: int, halts: int = 0) -> Callable[[Verdict], str]:
    """A step's rule: KVM counted at least ``exits`` exits of solve()'s one vCPU, ``halts`` of them at a hlt."""
    def rule(verdict: Verdict) -> str:
        counters = verdict.counters("solve")
        if len(counters) != 1 or counters[0]["exits"] < exits or counters[0]["halt_exits"] < halts:
            raise disagree(f"solve()'s vCPUs counted {[(c['exits'], c['halt_exits']) for c in counters]} "
                           f"(exits, halt_exits); this step needs one vCPU with at least ({exits}, {halts})")
        return f"KVM counted {counters[0]['exits']} exits, {counters[0]['halt_exits']} at a hlt"
    return rule


def _support(host) -> Support:
    where = "at" if host.io_exit_rip_at_out else "past"
    return Support(True, f"at an OUT exit this host reports RIP {where} the `out` (sheet question 2)")


LAB = Lab(
    number=1, title="First VM", minutes=40, folder=lab_folder(__file__),
    teaches="/dev/kvm, a VM, a memory slot, a vCPU in real mode, KVM_RUN's exits, answering a port IN",
    requires=(Cap.USER_MEMORY,),
    support=_support,
    steps=(
        Step("solve() creates a VM with one memory slot and a vCPU", check_vm,
             "pykvm.Kvm() opens /dev/kvm; create_vm(memory_size=0) makes a VM with no RAM at all; "
             "vm.memory.add_slot(guest_phys_addr, size) backs a range with a slot (sheet, step 1)", counted_by_kvm(1)),
        Step("the vCPU starts on the guest's first instruction", check_first_exit,
             "the code must be in guest memory before the first run(), and in real mode the CPU "
             "fetches from CS*16 + IP: which CS and IP make that task.address? (sheet, steps 2-3)", counted_by_kvm(1)),
        Step("the guest reads task.answer from its IN", check_answer,
             "an IN exit is a question: KVM finishes the instruction only at the next run(), with "
             "whatever data you gave the exit by then (sheet, 'IO exits')", counted_by_kvm(2)),
        Step("the guest runs to its hlt; KVM's registers and counters agree", check_hlt,
             "keep calling run() until the exit is a HltExit; check with vcpu.regs what the guest "
             "left in EBX (sheet, step 4)", counted_by_kvm(3, 1)),
    ),
)
