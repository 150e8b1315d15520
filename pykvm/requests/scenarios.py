"""One scenario per KVM_REQ_* request pykvm can raise: the host action, its guest, and the evidence.

Each scenario is ordinary pykvm code: a VM with a tiny long-mode guest
(assembled beside it), one host action that makes KVM raise the request, and
the evidence that KVM handled it before the next guest entry (an exit, a
counter of the vCPU or VM stats fd, a trace event, a change the guest can
see). ``control=True`` runs the same scenario without the trigger: the
evidence must then be absent. Verdicts are what this run measured.
"""

from __future__ import annotations

import contextlib
import dataclasses
import struct
from collections.abc import Callable, Iterator
from typing import Any

import pykvm
from pykvm import x86
from pykvm.core import uapi
from pykvm.core.exits import Exit, IoExit, MsrExit, ShutdownExit
from pykvm.core.stats import StatsDelta
from pykvm.runtime import trace

OBSERVED = "observed"
NO_EFFECT = "raised, no visible effect here"
UNREACHABLE = "not reachable here"
NOT_IMPLEMENTED = "not yet implemented in pykvm"

PORT_READY, PORT_HANDLER, PORT_LOOP = 0x10, 0x11, 0x12
DATA = 0x20000                 # guest-physical page for records the guest shares (kvmclock, steal time)
MSR_KVM_SYSTEM_TIME_NEW = 0x4B564D01
MSR_KVM_STEAL_TIME = 0x4B564D03
PVCLOCK = struct.Struct("<IIQQIbB2x")        # struct pvclock_vcpu_time_info
PVCLOCK_TSC_STABLE, PVCLOCK_GUEST_STOPPED = 1, 2
EXTRA_SLOT_GPA = 0x2000000                   # a second memory slot, above the default 16 MiB


@dataclasses.dataclass
class Step:
    """One line of the timeline: ``kind`` is host, exit, stats, trace, guest or note."""

    kind: str
    text: str


@dataclasses.dataclass
class Outcome:
    """What one run of a scenario measured."""

    request: str
    control: bool
    verdict: str
    why: str
    steps: list[Step] = dataclasses.field(default_factory=list)
    evidence: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def observed(self) -> bool:
        return self.verdict == OBSERVED

    def as_dict(self) -> dict[str, Any]:
        return {"request": self.request, "control": self.control, "verdict": self.verdict, "why": self.why,
                "steps": [dataclasses.asdict(step) for step in self.steps],
                "evidence": {key: _jsonable(value) for key, value in self.evidence.items()}}


def _jsonable(value: Any) -> Any:
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    return repr(value)


class Timeline:
    """Collects the steps of a run and the evidence it found."""

    def __init__(self, request: str, control: bool) -> None:
        self.outcome = Outcome(request, control, NO_EFFECT, "")
        self.traced: trace.Recording | None = None
        self.trace_problem = ""

    def add(self, kind: str, text: str) -> None:
        self.outcome.steps.append(Step(kind, text))

    def host(self, text: str) -> None:
        self.add("host", text)

    def exit(self, exit: Exit) -> Exit:
        self.add("exit", repr(exit))
        return exit

    def stats(self, label: str, delta: StatsDelta, names: tuple[str, ...]) -> dict[str, Any]:
        values = {name: delta.get(name, 0) for name in names if name in delta}
        self.add("stats", f"{label}: " + (", ".join(f"{k} +{v}" for k, v in values.items()) or "nothing"))
        return values

    def guest(self, text: str) -> None:
        self.add("guest", text)

    @contextlib.contextmanager
    def trace(self, *events: str) -> Iterator[trace.Recording | None]:
        """Record ``events`` over the block where tracing is possible; a note otherwise."""
        try:
            context = trace.record(*events)
            recording = context.__enter__()
        except trace.TraceError as exc:
            self.trace_problem = str(exc)
            self.add("note", f"no trace events: {exc}")
            yield None
            return
        try:
            yield recording
        except BaseException:
            context.__exit__(None, None, None)
            raise
        context.__exit__(None, None, None)
        for event in recording.events:
            self.add("trace", event.describe())
        if recording.silent:
            self.add("trace", "silent: " + ", ".join(recording.silent))
        if recording.missing:
            self.add("trace", "not on this kernel: " + ", ".join(recording.missing))
        self.traced = recording

    def verdict(self, seen: bool, why: str, absent_why: str = "") -> Outcome:
        """``observed`` when ``seen``; the control run's verdict says whether the evidence stayed absent."""
        outcome = self.outcome
        if outcome.control:
            outcome.verdict = "absent" if not seen else "present"
            outcome.why = absent_why or ("no trigger, no evidence" if not seen else "evidence without trigger")
        else:
            outcome.verdict = OBSERVED if seen else NO_EFFECT
            outcome.why = why
        return outcome


@contextlib.contextmanager
def machine(irqchip: str = "none", memory_size: int | None = None) -> Iterator[tuple[pykvm.Vm, pykvm.Vcpu]]:
    with pykvm.Kvm() as kvm, kvm.create_vm(irqchip=irqchip, memory_size=memory_size) as vm:
        yield vm, vm.create_vcpu()


def run_until(vcpu: pykvm.Vcpu, timeline: Timeline, accept: Callable[[Exit], bool], limit: int = 50) -> Exit:
    """Run until an exit ``accept`` takes (every exit goes on the timeline)."""
    for _ in range(limit):
        exit = vcpu.run()
        if accept(exit):
            return timeline.exit(exit)
    raise pykvm.PyKvmError(f"no matching exit in {limit} runs")


def is_port(port: int) -> Callable[[Exit], bool]:
    return lambda exit: isinstance(exit, IoExit) and exit.port == port


def io_port(exit: Exit) -> int | None:
    return exit.port if isinstance(exit, IoExit) else None


# ---- EVENT ----------------------------------------------------------------------

EVENT_GUEST = """
start:  sti
        nop                      # the instruction after sti runs in its interrupt shadow
loop:   out %al, $0x10           # ready: the host may inject now
        jmp loop
handler:
        mov $0x40, %eax
        out %al, $0x11           # the interrupt handler ran
        iretq
"""


def event(control: bool = False) -> Outcome:
    """KVM_INTERRUPT queues a vector and raises KVM_REQ_EVENT: the next entry injects it."""
    t = Timeline("EVENT", control)
    with machine() as (vm, vcpu):
        x86.load_code(vcpu, EVENT_GUEST, handlers={0x40: "handler"})
        run_until(vcpu, t, is_port(PORT_READY))
        with vcpu.stats.delta("req_event", "irq_injections") as d:
            if not control:
                t.host("KVM_INTERRUPT vector 0x40 (KVM raises KVM_REQ_EVENT)")
                vcpu.interrupt(0x40)
            else:
                t.host("nothing (control)")
            exit = t.exit(vcpu.run())
        stats = t.stats("vCPU", d, ("req_event", "irq_injections"))
        handled = io_port(exit) == PORT_HANDLER
        t.guest("handler of vector 0x40 ran" if handled else "the guest went on looping; no handler ran")
        t.outcome.evidence.update(stats, handler_ran=handled)
        return t.verdict(handled and stats["irq_injections"] >= 1 and stats["req_event"] >= 1,
                         "req_event and irq_injections counted, the guest's 0x40 handler ran")


# ---- NMI -------------------------------------------------------------------------

NMI_GUEST = """
loop:   out %al, $0x10
        jmp loop
nmi:    mov $2, %eax
        out %al, $0x11           # the NMI handler ran
        iretq
"""


def nmi(control: bool = False) -> Outcome:
    """KVM_NMI raises KVM_REQ_NMI: the next entry moves it to nmi.pending and injects vector 2."""
    t = Timeline("NMI", control)
    with machine() as (vm, vcpu):
        x86.load_code(vcpu, NMI_GUEST, handlers={2: "nmi"})
        run_until(vcpu, t, is_port(PORT_READY))
        with vcpu.stats.delta("nmi_injections") as d:
            if not control:
                t.host("KVM_NMI (KVM raises KVM_REQ_NMI)")
                vcpu.nmi()
                pending = vcpu.events.nmi.pending
                t.host(f"KVM_GET_VCPU_EVENTS: nmi.pending={pending}")
            else:
                t.host("nothing (control)")
            exit = t.exit(vcpu.run())
        stats = t.stats("vCPU", d, ("nmi_injections",))
        handled = io_port(exit) == PORT_HANDLER
        t.guest("NMI handler (vector 2) ran" if handled else "no NMI handler ran")
        t.outcome.evidence.update(stats, handler_ran=handled)
        return t.verdict(handled and stats["nmi_injections"] >= 1,
                         "nmi_injections counted, the guest's vector-2 handler ran")


# ---- TRIPLE_FAULT ----------------------------------------------------------------

TRIPLE_GUEST = """
loop:   out %al, $0x10
        jmp loop
"""


def triple_fault(control: bool = False) -> Outcome:
    """A pending triple fault set with KVM_SET_VCPU_EVENTS raises KVM_REQ_TRIPLE_FAULT: shutdown, no entry."""
    t = Timeline("TRIPLE_FAULT", control)
    with machine() as (vm, vcpu):
        vm.kvm.require(pykvm.Cap.X86_TRIPLE_FAULT_EVENT, "the TRIPLE_FAULT scenario")
        vm.enable_cap(pykvm.Cap.X86_TRIPLE_FAULT_EVENT, 1)
        x86.load_code(vcpu, TRIPLE_GUEST)
        run_until(vcpu, t, is_port(PORT_READY))
        vcpu.complete_pending_exit()
        rip = vcpu.regs.rip
        if not control:
            events = vcpu.events
            events.triple_fault.pending = 1
            events.flags = uapi.VCPUEVENT_VALID_TRIPLE_FAULT
            t.host("KVM_CAP_X86_TRIPLE_FAULT_EVENT on; KVM_SET_VCPU_EVENTS triple_fault.pending=1 "
                   "(KVM raises KVM_REQ_TRIPLE_FAULT)")
            vcpu.events = events
        else:
            t.host("nothing (control)")
        exit = t.exit(vcpu.run())
        shutdown = isinstance(exit, ShutdownExit)
        moved = vcpu.regs.rip != rip
        t.guest(f"RIP {'moved' if moved else 'unchanged'}: "
                f"{'the guest ran' if moved else 'KVM stopped before entering the guest'}")
        t.outcome.evidence.update(shutdown=shutdown, guest_ran=moved)
        return t.verdict(shutdown, "KVM_EXIT_SHUTDOWN without the guest running an instruction")


# ---- MSR_FILTER_CHANGED ----------------------------------------------------------

MSR_GUEST = """
loop:   mov $0x10, %ecx          # IA32_TIME_STAMP_COUNTER
        rdmsr
        out %al, $0x10
        jmp loop
"""


def msr_filter_changed(control: bool = False) -> Outcome:
    """KVM_X86_SET_MSR_FILTER raises KVM_REQ_MSR_FILTER_CHANGED: intercepts reload, the next RDMSR exits."""
    t = Timeline("MSR_FILTER_CHANGED", control)
    with machine() as (vm, vcpu):
        vm.enable_user_space_msr(uapi.MSR_EXIT_REASON_FILTER)
        t.host("KVM_ENABLE_CAP KVM_CAP_X86_USER_SPACE_MSR (reason: filter)")
        x86.load_code(vcpu, MSR_GUEST)
        run_until(vcpu, t, is_port(PORT_READY))
        if not control:
            t.host("KVM_X86_SET_MSR_FILTER: deny reads of MSR 0x10 (KVM raises KVM_REQ_MSR_FILTER_CHANGED)")
            vm.set_msr_filter([uapi.MsrFilterRange.deny(0x10, uapi.MSR_FILTER_READ)])
        else:
            t.host("nothing (control)")
        exits = []
        for _ in range(3):
            exit = t.exit(vcpu.run())
            exits.append(exit)
            if isinstance(exit, MsrExit):
                break
        msr = next((e for e in exits if isinstance(e, MsrExit)), None)
        late = msr is not None and exits.index(msr) > 0
        t.outcome.evidence.update(msr_exit=msr is not None, reason=msr.msr_reason if msr else None,
                                  exits_before=exits.index(msr) if msr else None)
        if msr is not None:
            t.guest(f"RDMSR 0x10 ended in KVM_EXIT_X86_RDMSR, reason {msr.msr_reason:#x} (filter)"
                    + (" one exit late" if late else ""))
        return t.verdict(msr is not None and msr.msr_reason == uapi.MSR_EXIT_REASON_FILTER,
                         "the guest's RDMSR became KVM_EXIT_X86_RDMSR with reason filter"
                         + (" (one exit late: this host runs guest code in batches)" if late else ""))


# ---- CLOCK_UPDATE ----------------------------------------------------------------

CLOCK_GUEST = f"""
        mov ${MSR_KVM_SYSTEM_TIME_NEW:#x}, %ecx
        mov ${DATA | 1:#x}, %eax      # kvmclock record at DATA, enabled
        xor %edx, %edx
        wrmsr
loop:   out %al, $0x10
        jmp loop
"""


def read_pvclock(vm: pykvm.Vm) -> dict[str, int]:
    version, _, tsc, system_time, mul, shift, flags = PVCLOCK.unpack(vm.memory.read(DATA, PVCLOCK.size))
    return {"version": version, "tsc_timestamp": tsc, "system_time": system_time, "flags": flags}


def clock_update(control: bool = False) -> Outcome:
    """KVM_SET_CLOCK and KVM_KVMCLOCK_CTRL raise KVM_REQ_CLOCK_UPDATE: the guest's kvmclock record is rewritten."""
    t = Timeline("CLOCK_UPDATE", control)
    with machine() as (vm, vcpu):
        x86.load_code(vcpu, CLOCK_GUEST)
        run_until(vcpu, t, is_port(PORT_READY))
        before = read_pvclock(vm)
        t.guest(f"kvmclock record: version {before['version']}, system_time {before['system_time']} ns, "
                f"flags {before['flags']:#x}")
        with t.trace("kvm:kvm_pvclock_update") as recording:
            if not control:
                clock = vm.get_clock().clock
                t.host(f"KVM_SET_CLOCK {clock} + 10 s; KVM_KVMCLOCK_CTRL (KVM raises KVM_REQ_CLOCK_UPDATE)")
                vm.set_clock(clock + 10_000_000_000)
                vcpu.kvmclock_ctrl()
            else:
                t.host("nothing (control)")
            run_until(vcpu, t, is_port(PORT_READY))
        after = read_pvclock(vm)
        jump = after["system_time"] - before["system_time"]
        t.guest(f"kvmclock record: version {after['version']} ({after['version'] - before['version']:+d}), "
                f"system_time {jump / 1e9:+.3f} s, flags {after['flags']:#x}")
        stopped = bool(after["flags"] & PVCLOCK_GUEST_STOPPED)
        events = recording.count("kvm:kvm_pvclock_update") if recording else None
        t.outcome.evidence.update(version_change=after["version"] - before["version"], system_time_jump=jump,
                                  guest_stopped=stopped, pvclock_update_events=events)
        seen = jump >= 9_000_000_000 and stopped and after["version"] > before["version"]
        return t.verdict(seen, "the guest's kvmclock record: version +2, system_time +10 s, "
                               "PVCLOCK_GUEST_STOPPED set")


# ---- STEAL_UPDATE ----------------------------------------------------------------

STEAL_GUEST = f"""
        mov ${MSR_KVM_STEAL_TIME:#x}, %ecx
        mov ${DATA | 1:#x}, %eax      # steal-time record at DATA (64-byte aligned), enabled
        xor %edx, %edx
        wrmsr
loop:   out %al, $0x10
        jmp loop
"""
STEAL_UNUSED_GUEST = """
loop:   out %al, $0x10
        jmp loop
"""


def steal_update(control: bool = False) -> Outcome:
    """Every vCPU load raises KVM_REQ_STEAL_UPDATE; with MSR_KVM_STEAL_TIME on, each entry rewrites the record."""
    t = Timeline("STEAL_UPDATE", control)
    with machine() as (vm, vcpu):
        x86.load_code(vcpu, STEAL_UNUSED_GUEST if control else STEAL_GUEST)
        t.host("guest runs " + ("without enabling steal time (control)" if control else
                                "wrmsr MSR_KVM_STEAL_TIME (0x4b564d03) = record | enable"))
        versions = []
        for _ in range(4):
            run_until(vcpu, t, is_port(PORT_READY))     # each KVM_RUN loads the vCPU: KVM_REQ_STEAL_UPDATE
            versions.append(vm.memory.read_u32(DATA + 8))   # struct kvm_steal_time: u64 steal, u32 version
        t.guest(f"steal-time record version after each run: {versions}")
        t.outcome.evidence.update(versions=versions)
        return t.verdict(versions[-1] > versions[0] and versions[-1] % 2 == 0,
                         "the steal-time record's version grows by 2 per KVM_RUN")


# ---- MMU_FREE_OBSOLETE_ROOTS ----------------------------------------------------

ROOTS_GUEST = f"""
        mov ${EXTRA_SLOT_GPA:#x}, %rbx
        mov (%rbx), %rax                # touch the second slot: KVM maps it
        movq $1, (%rbx)
loop:   out %al, $0x10
        jmp loop
"""


def mmu_free_obsolete_roots(control: bool = False) -> Outcome:
    """Deleting a memslot zaps all MMU pages fast and raises KVM_REQ_MMU_FREE_OBSOLETE_ROOTS: new roots next entry."""
    t = Timeline("MMU_FREE_OBSOLETE_ROOTS", control)
    events = ("kvmmmu:kvm_mmu_zap_all_fast", "kvmmmu:kvm_mmu_get_page", "kvmmmu:kvm_mmu_prepare_zap_page")
    with machine() as (vm, vcpu):
        slot = vm.memory.add_slot(EXTRA_SLOT_GPA, 0x10000)
        t.host(f"second memory slot {slot.slot} at {EXTRA_SLOT_GPA:#x}; the guest reads and writes it")
        x86.load_code(vcpu, ROOTS_GUEST)
        run_until(vcpu, t, is_port(PORT_READY))
        with t.trace(*events) as recording, vm.stats.delta() as vm_delta, vcpu.stats.delta() as vcpu_delta:
            if not control:
                t.host(f"KVM_SET_USER_MEMORY_REGION slot {slot.slot} size 0: delete it while the vCPU exists")
                vm.memory.remove_slot(slot.slot)
            else:
                t.host("nothing (control)")
            run_until(vcpu, t, is_port(PORT_READY))
        t.stats("VM", vm_delta, ("mmu_shadow_zapped", "remote_tlb_flush", "remote_tlb_flush_requests"))
        t.stats("vCPU", vcpu_delta, ("tlb_flush", "pf_taken", "pf_fixed"))
        if recording is None:
            t.outcome.evidence.update(traced=False)
            return t.verdict(False, f"needs trace events ({t.trace_problem})")
        zaps = recording.named("kvmmmu:kvm_mmu_zap_all_fast")
        root_gfn = vcpu.sregs.cr3 >> 12
        pages = [e for e in recording.named("kvmmmu:kvm_mmu_get_page") if zaps and e.time >= zaps[0].time]
        # A shadow-paging root shadows the guest's CR3 page; a TDP (NPT/EPT) root is direct, at gfn 0.
        roots = [e for e in pages if e.fields.get("gfn") in (root_gfn, 0)]
        t.outcome.evidence.update(zap_all_fast=len(zaps), pages_after_zap=len(pages), new_roots=len(roots),
                                  first_new_root=roots[0].describe() if roots else None)
        if zaps:
            t.guest(f"kvm_mmu_zap_all_fast in the ioctl made every root obsolete; at the next entry "
                    f"a new root (gfn {roots[0].fields.get('gfn', 0) if roots else root_gfn:#x}) and "
                    f"{max(len(pages) - 1, 0)} further page(s)"
                    + (f" (MMU generation {roots[0].fields.get('mmu_valid_gen')})" if roots else ""))
        return t.verdict(bool(zaps) and bool(roots),
                         "kvm_mmu_zap_all_fast at the deletion, then a new root (kvm_mmu_get_page for the "
                         "CR3 page) at the next entry")


# ---- TLB_FLUSH ------------------------------------------------------------------

TLB_GUEST = f"""
loop:   incq {DATA:#x}                 # dirty a page on every round
        out %al, $0x10
        jmp loop
"""


def tlb_flush(control: bool = False) -> Outcome:
    """KVM_GET_DIRTY_LOG write-protects the logged pages and raises KVM_REQ_TLB_FLUSH on every vCPU."""
    t = Timeline("TLB_FLUSH", control)
    with machine() as (vm, vcpu):
        x86.load_code(vcpu, TLB_GUEST)
        vm.memory.set_dirty_logging(0, True)
        t.host("KVM_SET_USER_MEMORY_REGION slot 0 with KVM_MEM_LOG_DIRTY_PAGES")
        run_until(vcpu, t, is_port(PORT_READY))
        with vm.stats.delta() as vm_delta, vcpu.stats.delta() as vcpu_delta:
            if not control:
                bitmap = vm.get_dirty_log(0)
                dirty = sum(bin(byte).count("1") for byte in bitmap)
                t.host(f"KVM_GET_DIRTY_LOG slot 0: {dirty} dirty pages (KVM raises KVM_REQ_TLB_FLUSH)")
            else:
                t.host("nothing (control)")
            run_until(vcpu, t, is_port(PORT_READY))
        vm_stats = t.stats("VM", vm_delta, ("remote_tlb_flush_requests", "remote_tlb_flush"))
        vcpu_stats = t.stats("vCPU", vcpu_delta, ("tlb_flush",))
        t.outcome.evidence.update(vm_stats, **vcpu_stats)
        return t.verdict(vm_stats.get("remote_tlb_flush_requests", 0) >= 1 and vcpu_stats["tlb_flush"] >= 1,
                         "VM remote_tlb_flush_requests and vCPU tlb_flush counted")


SCENARIOS: dict[str, Callable[..., Outcome]] = {
    "EVENT": event,
    "NMI": nmi,
    "TRIPLE_FAULT": triple_fault,
    "MSR_FILTER_CHANGED": msr_filter_changed,
    "CLOCK_UPDATE": clock_update,
    "MMU_FREE_OBSOLETE_ROOTS": mmu_free_obsolete_roots,
    "TLB_FLUSH": tlb_flush,
    "STEAL_UPDATE": steal_update,
}
