"""Lab 13, SMP: waking an AP with INIT and SIPI, then IPIs by physical ID, logical mask, shorthand and NMI.

Why this exists: on a multiprocessor guest one CPU starts the others and they
talk through inter-processor interrupts, which KVM's in-kernel LAPIC delivers.
The student sends every IPI from the BSP's guest code; the checker reads each
AP's MP state from KVM, where the woken AP started (its first exit and
segment registers), every CPU's vector log (``record.cpu``) and the vCPUs'
statistics, never what the student's functions return.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from ...core.constants import Cap, MpState
from ...core.errors import CommandTimeout, GuestCancelled, KvmBusy, VcpuThreadError
from ...core.exits import IoExit
from ...core.system import Kvm
from ...core.vcpu import Vcpu
from ...guests import Command, GuestSession, boot_cpus
from ...hosts import explain_exit
from ...irqchip.lapic import ApicReg
from ...runtime import WATCHDOG, command_in_thread
from ...runtime.cpu_wait import CpuFairDeadline
from ...x86.asm import assemble
from ...x86.modes import CR0_PE
from ...x86.vectors import Vector
from ..framework import Context, Fail, Lab, Step, Support, lab_folder
from ..verdict import Verdict, delivered, disagree

CPUS = 3
SIPI_PAGES = range(0x30, 0xA0)      # free guest memory below 1 MiB (0x30000-0x9FFFF): a stub on every page
STUB_PORT = 0x77
# Where a woken AP starts: it reports its CS selector (SIPI vector << 8), then halts.
STUB = f"""
        mov     %cs, %ax
stub_out:
        out     %ax, ${STUB_PORT:#x}
        hlt
        jmp     stub_out
"""
WAIT = 5.0                          # seconds a woken AP's first run may take (a watchdog against a hang)
IPI_WAIT = 2.0                      # seconds a halted CPU has to log an IPI or to halt, plus this process's
                                    # CPU wait meanwhile (a CpuFairDeadline): a wrong IPI costs only this


# -- INIT and SIPI -----------------------------------------------------------------------

@dataclasses.dataclass
class StartTask:
    bsp: GuestSession            # the BSP, long mode, LAPIC enabled: task.bsp.send_ipi(...)
    ap_id: int                   # the APIC ID of the AP to start
    sipi_vector: int             # the page (number) it must start at
    aps: list[Vcpu]              # the APs' vCPUs, APIC IDs 1, 2...: task.aps[i].mp_state (read only)

    def __repr__(self) -> str:
        return f"StartTask(ap_id={self.ap_id}, sipi_vector={self.sipi_vector:#x})"


def _first_run(vcpu: Vcpu) -> tuple[object, str]:
    """Run a woken AP to its first exit: (the exit or None, what happened)."""
    with WATCHDOG.guard(WAIT, vcpu.kick):
        for _ in range(2):       # an AP leaving UNINITIALIZED makes KVM_RUN return EAGAIN once
            try:
                return vcpu.run(), ""
            except KvmBusy:
                continue
    return None, "KVM_RUN kept returning EAGAIN"


def _start_ap(ctx: Context) -> dict:
    rng = ctx.random("start_ap")
    ctx.load()
    with Kvm() as kvm, kvm.create_vm(irqchip="kernel") as vm:
        [bsp] = boot_cpus(vm, "long", 1, explain=explain_exit)
        aps = [vm.create_vcpu() for _ in range(CPUS - 1)]
        stub = assemble(STUB, "real", origin=0)
        for page in SIPI_PAGES:
            vm.memory.write(page << 12, stub.code)
        bsp.apic_enable()
        task = StartTask(bsp, rng.randrange(1, CPUS), rng.choice(SIPI_PAGES), aps)
        target = aps[task.ap_id - 1]
        initial = [ap.mp_state for ap in aps]
        ctx.call("send_init", task)
        after_init = [ap.mp_state for ap in aps]      # KVM_GET_MP_STATE takes pending INIT/SIPI first
        ctx.call("send_startup", task)
        after_sipi = [ap.mp_state for ap in aps]
        exit, problem = (None, "") if after_sipi[task.ap_id - 1] != MpState.RUNNABLE else _first_run(target)
        sregs = target.sregs
        return {"task": task, "initial": initial, "after_init": after_init, "after_sipi": after_sipi,
                "exit": exit, "problem": problem, "cs": sregs.cs.selector, "cs_base": sregs.cs.base,
                "cr0": sregs.cr0, "rip": target.regs.rip, "stub_out": stub.symbols["stub_out"]}


def _states(states: list[MpState]) -> str:
    return ", ".join(f"AP {cpu} {MpState(state).name}" for cpu, state in enumerate(states, 1))


def check_init(ctx: Context) -> str:
    run = ctx.once("start_ap", _start_ap)
    task, after = run["task"], run["after_init"]
    if any(state != MpState.UNINITIALIZED for state in run["initial"]):
        raise Fail(f"the APs did not start out waiting: {_states(run['initial'])}")
    wanted = [MpState.INIT_RECEIVED if cpu == task.ap_id else MpState.UNINITIALIZED for cpu in range(1, CPUS)]
    if after != wanted:
        cause = ("no INIT reached it: an AP ignores a SIPI until an INIT has put it in wait-for-SIPI"
                 if after[task.ap_id - 1] == MpState.UNINITIALIZED else "an INIT reached another AP too")
        raise Fail(f"after send_init(): {_states(after)}; AP {task.ap_id} should be INIT_RECEIVED and the "
                   f"others UNINITIALIZED ({cause})")
    return f"after send_init(): {_states(after)}"


def check_startup(ctx: Context) -> str:
    run = ctx.once("start_ap", _start_ap)
    task, after = run["task"], run["after_sipi"]
    state = MpState(after[task.ap_id - 1])
    if state != MpState.RUNNABLE:
        raise Fail(f"after send_startup(): {_states(after)}; the SIPI did not start AP {task.ap_id}" +
                   (" (it was not waiting for one: INIT first)" if state == MpState.UNINITIALIZED else ""))
    exit = run["exit"]
    if not isinstance(exit, IoExit) or exit.port != STUB_PORT:
        raise Fail(f"AP {task.ap_id} was RUNNABLE but its first run ended with {exit or run['problem']} "
                   f"at CS {run['cs']:#x} RIP {run['rip']:#x}")
    page = exit.value >> 8
    if page != task.sipi_vector:
        raise Fail(f"AP {task.ap_id} started on page {page:#x} (CS {exit.value:#x}), not task.sipi_vector="
                   f"{task.sipi_vector:#x}: the SIPI's vector field is the page number; if you sent more than "
                   f"one SIPI, KVM started the AP at the last one's page (it acts on a pending SIPI only at "
                   f"the AP's next KVM_RUN or KVM_GET_MP_STATE)")
    # At an IO exit some hosts report RIP at the `out` (2 bytes: opcode, port), others past it.
    rip = run["stub_out"] + (0 if ctx.host.io_exit_rip_at_out else 2)
    if run["cr0"] & CR0_PE or run["cs_base"] != task.sipi_vector << 12 or run["rip"] != rip:
        raise Fail(f"AP {task.ap_id} is not in real mode at {task.sipi_vector << 12:#x}: CR0 {run['cr0']:#x}, "
                   f"CS base {run['cs_base']:#x}, RIP {run['rip']:#x} (the stub's `out` is at {run['stub_out']:#x})")
    return (f"AP {task.ap_id} RUNNABLE; it started in real mode at CS:IP {exit.value:#x}:0 (linear "
            f"{task.sipi_vector << 12:#x}) and reported its CS with an OUT")


# -- IPIs ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Ipi:
    kind: str                    # "one", "mask", "all-but-self" or "nmi"
    vector: int                  # the vector to send (an NMI is vector 2 whatever the ICR says)
    cpus: frozenset[int]         # the vCPUs that must take it

    def __repr__(self) -> str:
        return f"Ipi({self.kind!r}, vector={self.vector:#x}, cpus={sorted(self.cpus)})"


@dataclasses.dataclass
class IpiTask:
    bsp: GuestSession
    cpus: list[GuestSession]     # every CPU's session; task.cpus[0] is the BSP
    apic_ids: dict[int, int]     # vCPU -> its APIC ID (physical destination)
    logical_ids: dict[int, int]  # vCPU -> its logical APIC ID (LDR bits 31:24, flat model: one bit)

    def __repr__(self) -> str:
        return (f"IpiTask(apic_ids={self.apic_ids}, "
                f"logical_ids={ {cpu: hex(i) for cpu, i in self.logical_ids.items()} })")


def _drain(cpus: list[GuestSession], skip: frozenset[int] = frozenset()) -> None:
    """Let every CPU take what is pending on it (IF=1 for two entries), then IF=0 again."""
    for cpu in cpus:
        if cpu.vcpu.id not in skip:
            cpu.command(Command.STI)
            cpu.command(Command.NOP)
            cpu.command(Command.CLI)


COUNTERS = ("halt_exits", "halt_wakeup", "irq_injections", "nmi_injections")


def _counters(cpu: GuestSession) -> dict[str, int]:
    """The vCPU statistics (stats fd) the checker shows; all plain counters."""
    values = cpu.vcpu.stats.read()
    return {name: value for name in COUNTERS if isinstance(value := values[name], int)}


def _halted(cpu: GuestSession, before: int) -> bool:
    deadline = CpuFairDeadline(IPI_WAIT)
    while not deadline.expired():
        if _counters(cpu)["halt_exits"] > before:
            return True
        time.sleep(0.002)
    return False


def _ipis(ctx: Context) -> dict:
    rng = ctx.random("send_ipi")
    ctx.load()
    with Kvm() as kvm, kvm.create_vm(irqchip="kernel") as vm:
        cpus = boot_cpus(vm, "long", CPUS, explain=explain_exit)
        bits = rng.sample(range(8), CPUS)
        for cpu, bit in zip(cpus, bits, strict=True):
            cpu.apic_enable()
            cpu.apic_write(ApicReg.DFR, 0xFFFFFFFF)            # flat model
            cpu.apic_write(ApicReg.LDR, 1 << (24 + bit))
            cpu.command(Command.CLI)
        task = IpiTask(cpus[0], cpus, {c.vcpu.id: c.vcpu.id for c in cpus},
                       {c.vcpu.id: 1 << bit for c, bit in zip(cpus, bits, strict=True)})
        vectors = rng.sample(range(0x40, 0xF0), 3)
        aps = list(range(1, CPUS))
        requests = [Ipi("mask", vectors[0], frozenset(rng.sample(range(CPUS), 2))),
                    Ipi("all-but-self", vectors[1], frozenset(aps)),
                    Ipi("nmi", Vector.NMI, frozenset({rng.choice(aps)})),
                    Ipi("one", vectors[2], frozenset({rng.choice(aps)}))]
        results = {}
        for ipi in requests:
            counts = [cpu.log_count() for cpu in cpus]
            stats = [_counters(cpu) for cpu in cpus]
            waiter, halted = None, False
            if ipi.kind == "one":           # the target waits in `hlt`: the IPI must wake it
                [target] = ipi.cpus
                waiter = command_in_thread(cpus[target], Command.WAIT_LOG, counts[target] + 1)
                halted = _halted(cpus[target], stats[target]["halt_exits"])
            exits_before = len(ctx.trace.exits)
            ctx.call("send_ipi", task, ipi)
            sender_exits = [r for r in ctx.trace.exits[exits_before:] if r.vcpu == 0]
            woken: frozenset[int] = frozenset()
            if waiter is not None:
                try:
                    waiter.result(CpuFairDeadline(IPI_WAIT))
                except (VcpuThreadError, CommandTimeout, GuestCancelled):
                    pass                   # it was never woken: its log says so
                woken = ipi.cpus
            _drain(cpus, skip=woken)
            results[ipi.kind] = {
                "ipi": ipi, "halted": halted, "sender_exits": sender_exits,
                "taken": {cpu.vcpu.id: cpu.records_since(count) for cpu, count in zip(cpus, counts, strict=True)},
                "delta": {cpu.vcpu.id: {name: value - before[name] for name, value in _counters(cpu).items()}
                          for cpu, before in zip(cpus, stats, strict=True)}}
            if waiter is not None:
                break                      # a timed-out session takes no more commands
        return {"task": task, "results": results, "sync_done": cpus[0].address("sync_done")}


def _judge(ctx: Context, kind: str) -> dict:
    run = ctx.once("send_ipi", _ipis)
    result = run["results"][kind]
    ipi, taken = result["ipi"], result["taken"]
    got = {cpu: [r.vector for r in records] for cpu, records in taken.items()}
    wanted = {cpu: [ipi.vector] if cpu in ipi.cpus else [] for cpu in taken}
    if got != wanted:
        wrong = [f"CPU {cpu} took {[hex(v) for v in got[cpu]] or 'nothing'}" for cpu in sorted(got)
                 if got[cpu] != wanted[cpu]]
        raise Fail(f"{ipi}: {'; '.join(wrong)} (CPUs {sorted(ipi.cpus)} should take {ipi.vector:#x} once, "
                   f"the others nothing)")
    mmio = [r for r in result["sender_exits"] if r.kind == "MmioExit"]
    if mmio:
        raise Fail(f"the BSP's ICR write reached userspace ({mmio[0].exit}): send IPIs from the guest "
                   f"(task.bsp.send_ipi), where KVM's in-kernel LAPIC handles the write")
    return result


def _stayed_in_kvm(result: dict) -> str:
    """The evidence that the ICR write never left the kernel: the BSP's exits to userspace during the call."""
    kinds = sorted({record.kind for record in result["sender_exits"]})
    return (f"; the BSP's exits to userspace during your call: {len(result['sender_exits'])} "
            f"({', '.join(kinds) or 'none'}), no MMIO exit: KVM handled the ICR write")


def check_one(ctx: Context) -> str:
    result = _judge(ctx, "one")
    [target] = result["ipi"].cpus
    if not result["halted"]:
        raise Fail(f"CPU {target} never halted before the IPI was sent; the checker cannot judge the wake-up")
    delta = result["delta"][target]
    if delta["halt_wakeup"] < 1:
        raise Fail(f"CPU {target} took the vector, but KVM counted no halt wake-up on it")
    return (f"CPU {target}, halted in `hlt`, was woken and took {result['ipi'].vector:#x}: its halt_wakeup "
            f"+{delta['halt_wakeup']}, irq_injections +{delta['irq_injections']} during this call"
            + _stayed_in_kvm(result))


def check_mask(ctx: Context) -> str:
    result = _judge(ctx, "mask")
    run = ctx.once("send_ipi", _ipis)
    where = {cpu: records[0].rip for cpu, records in result["taken"].items() if records}
    at_sync = all(rip == run["sync_done"] for rip in where.values())
    return (f"CPUs {sorted(result['ipi'].cpus)} took {result['ipi'].vector:#x}; held while they had IF=0, "
            + ("taken at the next VM entry after their `sti` (sync_done)" if at_sync else
               f"taken right after their `sti` (RIPs {', '.join(hex(r) for r in where.values())})")
            + _stayed_in_kvm(result))


def check_all_but_self(ctx: Context) -> str:
    result = _judge(ctx, "all-but-self")
    return (f"every AP ({sorted(result['ipi'].cpus)}) took {result['ipi'].vector:#x}, the BSP nothing"
            + _stayed_in_kvm(result))


def check_nmi(ctx: Context) -> str:
    result = _judge(ctx, "nmi")
    [target] = result["ipi"].cpus
    [record] = result["taken"][target]
    if record.interrupts_were_enabled:
        raise Fail("the NMI was taken while the CPU had IF=1: the checker expected IF=0")
    delta = result["delta"][target]
    return (f"CPU {target} took the NMI with IF=0 (an NMI ignores IF); its nmi_injections "
            f"+{delta['nmi_injections']} during this call" + _stayed_in_kvm(result))


def ipis_delivered(at_least: int) -> Callable[[Verdict], str]:
    """A step's rule: KVM injected at least ``at_least`` interrupts during send_ipi()'s run (only the IPIs do)."""
    def rule(verdict: Verdict) -> str:
        return (f"KVM's irq_injections per vCPU over the run of all four send_ipi() calls: "
                f"{delivered(verdict, 'send_ipi', at_least)}")
    return rule


def nmi_delivered(verdict: Verdict) -> str:
    counted = [c["nmi_injections"] for c in verdict.counters("send_ipi")]
    if not any(counted):
        raise disagree(f"KVM injected no NMI into any vCPU during send_ipi()'s run ({counted})")
    return f"KVM's nmi_injections per vCPU over the run of all four send_ipi() calls: {counted}"


def _support(host) -> Support:
    if host.lapic_delivers_when_unblocked:
        return Support(True, "an IPI held while the target has IF=0 is taken right after its `sti`")
    return Support(True, "an IPI held while the target has IF=0 is taken only at its next VM entry "
                         "after the `sti`; a halted or running target is still kicked at once")


LAB = Lab(
    number=13, title="SMP: INIT/SIPI and IPIs", minutes=60, folder=lab_folder(__file__),
    teaches="MP states, waking an AP with INIT and SIPI (real mode at vector x 0x1000), the ICR: physical "
            "and logical destinations, shorthands, NMI IPIs, and who delivers an IPI in KVM",
    requires=(Cap.IRQCHIP,),
    support=_support,
    steps=(
        Step("INIT puts the chosen AP, and only it, in INIT_RECEIVED", check_init,
             "an INIT IPI is an ICR write with delivery mode INIT (5) to the AP's APIC ID; "
             "vcpu.mp_state shows what KVM made of it"),
        Step("the SIPI starts it in real mode at task.sipi_vector x 0x1000", check_startup,
             "a SIPI is delivery mode STARTUP (6); its vector field is the page the AP starts at, "
             "and it only works on an AP an INIT left waiting"),
        Step("a fixed IPI to one APIC ID wakes that halted CPU only", check_one,
             "physical destination mode: the ICR's destination field (bits 63:56) is the target's APIC ID",
             ipis_delivered(1)),
        Step("a logical IPI reaches exactly the CPUs of a mask", check_mask,
             "logical destination mode (ICR bit 11): in the flat model each CPU's LDR holds one bit, and "
             "the destination is the OR of the targets' bits", ipis_delivered(2)),
        Step("the all-excluding-self shorthand reaches every other CPU", check_all_but_self,
             "a shorthand (ICR bits 19:18) replaces the destination: 1 self, 2 all including self, "
             "3 all excluding self", ipis_delivered(CPUS - 1)),
        Step("an NMI IPI is taken even with IF=0", check_nmi,
             "delivery mode NMI (4); the vector field is ignored", nmi_delivered),
    ),
)
