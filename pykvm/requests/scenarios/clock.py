"""The clock requests: kvmclock, the master clock, steal time and timer migration.

Why this exists: a guest's sense of time comes from KVM in three ways (the
kvmclock record it maps, the steal-time record, and the LAPIC timer KVM runs on
a host hrtimer), and KVM keeps each correct with a request raised when
something changes (a clock MSR write, a TSC write, the vCPU moving to another
host CPU). Each scenario here makes one such change, with one tiny guest, and
shows what KVM did at the next entry: the guest's records, trace events.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Iterator, Sequence

import pykvm
from pykvm import x86
from pykvm.irqchip import lapic
from pykvm.irqchip.lapic import ApicReg
from pykvm.runtime import trace
from pykvm.x86.msr import TSC_MSR, XAPIC_BASE

from .common import (
    DATA,
    MSR_KVM_STEAL_TIME,
    MSR_KVM_SYSTEM_TIME_NEW,
    OBSERVED,
    PORT_READY,
    PVCLOCK,
    PVCLOCK_GUEST_STOPPED,
    PVCLOCK_TSC_STABLE,
    UNREACHABLE,
    ScenarioRecorder,
    ScenarioResult,
    io_port,
    is_port,
    machine,
    request,
    run_until,
)

MSR_KVM_SYSTEM_TIME = 0x12      # kvmclock's first MSR (KVM_FEATURE_CLOCKSOURCE), before 0x4b564d01
COMMAND = DATA + 0x100          # the host puts an MSR number here: the guest writes that clock MSR once
SECOND_RECORD = DATA + 0x40     # a second vCPU's kvmclock record
SECOND_CODE = x86.FREE_MEMORY + 0x1000


def kvmclock_guest(record: int = DATA, command: int = COMMAND) -> str:
    """Enable kvmclock (MSR 0x4b564d01) with its record at ``record``, then report ready (port 0x10) forever.

    When the host puts an MSR number in the dword at ``command``, the guest clears it and writes that MSR
    once with the same value (the record's address, enabled): one guest clock-MSR write on request.
    """
    return f"""
        mov ${MSR_KVM_SYSTEM_TIME_NEW:#x}, %ecx
        mov ${record | 1:#x}, %eax     # kvmclock record, enabled
        xor %edx, %edx
        wrmsr
loop:   out %al, $0x10
        mov {command:#x}, %ecx        # an MSR the host asks the guest to write, 0 for none
        test %ecx, %ecx
        jz loop
        movl $0, {command:#x}
        wrmsr
        jmp loop
"""


def read_pvclock(vm: pykvm.Vm, address: int = DATA) -> dict[str, int]:
    version, _, tsc, system_time, mul, shift, flags = PVCLOCK.unpack(vm.memory.read(address, PVCLOCK.size))
    return {"version": version, "tsc_timestamp": tsc, "system_time": system_time, "flags": flags}


@contextlib.contextmanager
def pinned(cpu: int) -> Iterator[None]:
    """Run the calling thread (the vCPU thread) on host CPU ``cpu`` only; its affinity is restored after."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


# ---- CLOCK_UPDATE ----------------------------------------------------------------

def clock_update(control: bool = False) -> ScenarioResult:
    """KVM_SET_CLOCK and KVM_KVMCLOCK_CTRL raise KVM_REQ_CLOCK_UPDATE: the guest's kvmclock record is rewritten."""
    t = ScenarioRecorder("CLOCK_UPDATE", control)
    with machine() as (vm, vcpu):
        x86.load_code(vcpu, kvmclock_guest())
        run_until(vcpu, t, is_port(PORT_READY))
        before = read_pvclock(vm)
        t.guest(
            f"kvmclock record: version {before['version']}, system_time {before['system_time']} ns, "
            f"flags {before['flags']:#x}"
        )
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
        t.guest(
            f"kvmclock record: version {after['version']} ({after['version'] - before['version']:+d}), "
            f"system_time {jump / 1e9:+.3f} s, flags {after['flags']:#x}"
        )
        stopped = bool(after["flags"] & PVCLOCK_GUEST_STOPPED)
        events = recording.count("kvm:kvm_pvclock_update") if recording else None
        t.outcome.evidence.update(
            version_change=after["version"] - before["version"],
            system_time_jump=jump,
            guest_stopped=stopped,
            pvclock_update_events=events,
        )
        seen = jump >= 9_000_000_000 and stopped and after["version"] > before["version"]
        return t.verdict(seen, "the guest's kvmclock record: version +2, system_time +10 s, PVCLOCK_GUEST_STOPPED set")


# ---- GLOBAL_CLOCK_UPDATE ---------------------------------------------------------

QUIET_SECONDS = 0.3     # no record change for this long (3x KVM's 100 ms delay): no kvmclock_update_work is pending
SETTLE_ROUNDS = 10      # at most this many quiet checks before the trigger
WINDOW_SECONDS = 1.0    # the delayed work must land inside it, also on a slow (emulated, shared) host
AFTER_SECONDS = 0.2     # once both records moved, watch this long (2x KVM's delay) for a second update
ROUND_PAUSE = 0.001     # between rounds: the time resolution, against a 100 ms effect; spinning burnt a CPU


@dataclasses.dataclass(frozen=True)
class RecordChange:
    """A vCPU's kvmclock record got a new version while the host kept re-entering the guests."""

    seconds: float      # after the window began
    vcpu: int
    version: int


def spin(vm: pykvm.Vm, vcpus: Sequence[pykvm.Vcpu], records: Sequence[int], seconds: float,
         after_all_moved: float | None = None) -> list[RecordChange]:
    """Re-enter each vCPU in turn for ``seconds`` (each stops at its next ``out`` to port 0x10), reading the
    kvmclock records after every round: KVM handles a vCPU's requests only when it enters it. With
    ``after_all_moved``, stop that long after every record has changed."""
    last = [read_pvclock(vm, record)["version"] for record in records]
    changes: list[RecordChange] = []
    start = time.monotonic()
    end = start + seconds
    while (now := time.monotonic()) < end:
        for vcpu in vcpus:
            exit = vcpu.run()
            if io_port(exit) != PORT_READY:
                raise pykvm.PyKvmError(f"vCPU {vcpu.id}: expected its guest at port {PORT_READY:#x}, got {exit!r}")
        for index, record in enumerate(records):
            version = read_pvclock(vm, record)["version"]
            if version != last[index]:
                changes.append(RecordChange(now - start, index, version))
                last[index] = version
                if after_all_moved is not None and {c.vcpu for c in changes} == set(range(len(records))):
                    end = min(end, now + after_all_moved)
        time.sleep(ROUND_PAUSE)
    return changes


def global_clock_update(control: bool = False) -> ScenarioResult:
    """A guest write of MSR_KVM_SYSTEM_TIME_NEW raises KVM_REQ_GLOBAL_CLOCK_UPDATE: every vCPU's kvmclock record
    is rewritten, the writer's now and the others' 100 ms later (kvmclock_update_work)."""
    t = ScenarioRecorder("GLOBAL_CLOCK_UPDATE", control)
    with machine() as (vm, vcpu), pinned(min(os.sched_getaffinity(0))):
        other = vm.create_vcpu()
        x86.load_code(vcpu, kvmclock_guest(DATA))
        x86.load_code(other, kvmclock_guest(SECOND_RECORD, COMMAND + 4), origin=SECOND_CODE)
        t.host(f"two vCPUs on one pinned thread; each guest enables kvmclock (record {DATA:#x}, {SECOND_RECORD:#x})")
        busy = 0
        while spin(vm, (vcpu, other), (DATA, SECOND_RECORD), QUIET_SECONDS):
            busy += 1
            if busy == SETTLE_ROUNDS:       # the records change with no trigger: updates cannot be told apart
                t.outcome.evidence.update(settled=False)
                why = f"the kvmclock records kept changing for {busy * QUIET_SECONDS:.1f} s with no trigger"
                return t.verdict(control, why, why)
        t.host(f"both re-entered until neither record changed for {QUIET_SECONDS} s (after {busy} busy round(s)): "
               "the updates of their first entries are done")
        before = [read_pvclock(vm, record)["version"] for record in (DATA, SECOND_RECORD)]
        with t.trace("kvm:kvm_pvclock_update", "kvm:kvm_msr") as recording:
            if not control:
                vm.memory.write_u32(COMMAND, MSR_KVM_SYSTEM_TIME_NEW)
                t.host("vCPU 0's guest writes MSR 0x4b564d01 again (KVM raises KVM_REQ_GLOBAL_CLOCK_UPDATE); "
                       "vCPU 1's guest does nothing but report ready")
            else:
                t.host("nothing (control): neither guest writes a clock MSR")
            changes = spin(vm, (vcpu, other), (DATA, SECOND_RECORD), WINDOW_SECONDS, AFTER_SECONDS)
            t.host(f"both re-entered every {ROUND_PAUSE * 1000:g} ms for {WINDOW_SECONDS} s, or until "
                   f"{AFTER_SECONDS} s after both records moved")
        for change in changes:
            t.guest(f"{change.seconds * 1000:6.1f} ms: vCPU {change.vcpu}'s kvmclock record version {change.version}")
        first = {index: next((c.seconds for c in changes if c.vcpu == index), None) for index in (0, 1)}
        msr_writes = None
        if recording is not None:
            msr_writes = sum(1 for e in recording.named("kvm:kvm_msr")
                             if e["write"] and e["ecx"] == MSR_KVM_SYSTEM_TIME_NEW)
        t.outcome.evidence.update(
            versions_before=before,
            changes=[dataclasses.astuple(change) for change in changes],
            writer_updated_after=first[0],
            other_updated_after=first[1],
            other_updates=sum(1 for c in changes if c.vcpu == 1),
            guest_msr_writes=msr_writes,
        )
        seen = first[0] is not None and first[1] is not None and first[1] >= 0.05 and first[1] > first[0]
        return t.verdict(seen, "the writer's kvmclock record is rewritten at once; the other vCPU's, which did "
                               "nothing, about 100 ms later (kvmclock_update_work)")


# ---- MASTERCLOCK_UPDATE ----------------------------------------------------------

def masterclock_update(control: bool = False) -> ScenarioResult:
    """The boot vCPU switching kvmclock MSRs, and a host write of IA32_TSC, raise KVM_REQ_MASTERCLOCK_UPDATE:
    KVM recomputes the master clock (kvm_update_master_clock) and every kvmclock record follows it."""
    t = ScenarioRecorder("MASTERCLOCK_UPDATE", control)
    events = ("kvm:kvm_update_master_clock", "kvm:kvm_track_tsc", "kvm:kvm_pvclock_update")
    with machine() as (vm, vcpu), pinned(min(os.sched_getaffinity(0))):
        x86.load_code(vcpu, kvmclock_guest())
        run_until(vcpu, t, is_port(PORT_READY))     # the first entry's own master-clock update happens here
        records = [read_pvclock(vm)]
        t.guest(f"kvmclock enabled: flags {records[0]['flags']:#x} (PVCLOCK_TSC_STABLE = master clock in use)")
        plan: tuple[tuple[int, str], ...] = (
            (MSR_KVM_SYSTEM_TIME, "the old kvmclock MSR: vCPU 0 switches ABI, KVM raises KVM_REQ_MASTERCLOCK_UPDATE"),
            (MSR_KVM_SYSTEM_TIME_NEW, "the new kvmclock MSR again: a switch back, another request"),
        )
        if control:
            plan = tuple((MSR_KVM_SYSTEM_TIME_NEW, "the kvmclock MSR it already uses: no switch (control)")
                         for _ in plan)
        with t.trace(*events) as recording:
            for msr, meaning in plan:
                t.host(f"the guest writes MSR {msr:#x} ({meaning})")
                vm.memory.write_u32(COMMAND, msr)
                run_until(vcpu, t, is_port(PORT_READY))
                records.append(read_pvclock(vm))
                t.guest(f"kvmclock flags {records[-1]['flags']:#x}")
            switched = time.monotonic()
            if not control:
                tsc = vcpu.get_msrs([TSC_MSR])[TSC_MSR]
                ahead = 10 * vcpu.tsc_khz * 1000
                t.host(f"KVM_SET_MSRS IA32_TSC = guest TSC + 10 s ({ahead} ticks): a new TSC generation "
                       "(KVM raises KVM_REQ_MASTERCLOCK_UPDATE when the master clock is in use)")
                vcpu.set_msrs({TSC_MSR: tsc + ahead})
            else:
                t.host("nothing (control): IA32_TSC is left alone")
            run_until(vcpu, t, is_port(PORT_READY))
            records.append(read_pvclock(vm))
            t.guest(f"kvmclock flags {records[-1]['flags']:#x}, tsc_timestamp "
                    f"{records[-1]['tsc_timestamp'] - records[-2]['tsc_timestamp']:+d}")
        stable = [int(bool(record["flags"] & PVCLOCK_TSC_STABLE)) for record in records]
        evidence = t.outcome.evidence
        evidence.update(tsc_stable=stable, snapshot_moved=records[-1]["tsc_timestamp"] != records[-2]["tsc_timestamp"])
        if recording is not None:
            updates = recording.named("kvm:kvm_update_master_clock")
            evidence.update(
                switch_updates=[e["use_master_clock"] for e in updates if e.time < switched],
                tsc_write_updates=[e["use_master_clock"] for e in updates if e.time >= switched],
                tsc_tracked=recording.count("kvm:kvm_track_tsc"),
            )
        seen = len(evidence.get("switch_updates", ())) >= 2 or stable[:3] == [1, 0, 1]
        return t.verdict(seen, "kvm_update_master_clock after each kvmclock MSR switch of the boot vCPU (master "
                               "clock off under the old MSR, on again under the new one; the guest's "
                               "PVCLOCK_TSC_STABLE follows where the host clock is the TSC)")


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


def steal_update(control: bool = False) -> ScenarioResult:
    """Every vCPU load raises KVM_REQ_STEAL_UPDATE; with MSR_KVM_STEAL_TIME on, each entry rewrites the record."""
    t = ScenarioRecorder("STEAL_UPDATE", control)
    with machine() as (vm, vcpu):
        x86.load_code(vcpu, STEAL_UNUSED_GUEST if control else STEAL_GUEST)
        t.host(
            "guest runs "
            + (
                "without enabling steal time (control)"
                if control
                else "wrmsr MSR_KVM_STEAL_TIME (0x4b564d03) = record | enable"
            )
        )
        versions = []
        for _ in range(4):
            run_until(vcpu, t, is_port(PORT_READY))  # each KVM_RUN loads the vCPU: KVM_REQ_STEAL_UPDATE
            versions.append(vm.memory.read_u32(DATA + 8))  # struct kvm_steal_time: u64 steal, u32 version
        t.guest(f"steal-time record version after each run: {versions}")
        t.outcome.evidence.update(versions=versions)
        return t.verdict(
            versions[-1] > versions[0] and versions[-1] % 2 == 0,
            "the steal-time record's version grows by 2 per KVM_RUN (by 2 per update: more where the host "
            "scheduled the vCPU thread out and back in during a run, which loads the vCPU again)",
        )


# ---- MIGRATE_TIMER ---------------------------------------------------------------

TIMER_GUEST = f"""
        mov ${XAPIC_BASE:#x}, %ebx
        movl $0x1ff, {ApicReg.SVR:#x}(%rbx)             # APIC software-enabled
        movl $0xa, {ApicReg.TIMER_DIVIDE:#x}(%rbx)      # divide by 128
        movl $0x40, {ApicReg.LVT_TIMER:#x}(%rbx)        # one-shot, vector 0x40 (IF stays 0: never delivered)
        movl $0xffffffff, {ApicReg.TIMER_INITIAL:#x}(%rbx)   # 2^32 * 128 bus cycles: minutes away
loop:   out %al, $0x10
        jmp loop
"""
MOVES = 4
TIMER_FUNCTION = "apic_timer_fn"  # lapic.c: the hrtimer callback of the in-kernel LAPIC timer


def kernel_address(symbol: str) -> int | None:
    """Where ``symbol`` is in the running kernel, from /proc/kallsyms; None when it is absent, unreadable or hidden
    (without privilege kptr_restrict shows every address as 0)."""
    try:
        with open("/proc/kallsyms") as symbols:
            for line in symbols:
                parts = line.split()
                if len(parts) >= 3 and parts[2] == symbol:
                    return int(parts[0], 16) or None
    except OSError:
        return None
    return None


def runs_function(event: trace.TraceEvent, symbol: str, address: int | None) -> bool:
    """Whether an hrtimer event's ``function`` is ``symbol``: some kernels print the field as a symbol
    (``apic_timer_fn+0x0/0x60 (...)``), others as an address, then compared with ``address``."""
    value = event.fields.get("function")
    if isinstance(value, int):
        return address is not None and value == address
    return str(value).split("+", 1)[0].strip() == symbol


def migrate_timer(control: bool = False) -> ScenarioResult:
    """Loading the vCPU on another host CPU raises KVM_REQ_MIGRATE_TIMER: the LAPIC timer's hrtimer is cancelled
    and started again on the new CPU (__kvm_migrate_apic_timer), keeping its expiry."""
    t = ScenarioRecorder("MIGRATE_TIMER", control)
    allowed = sorted(os.sched_getaffinity(0))
    with pykvm.Kvm() as kvm:
        if not kvm.check_extension(pykvm.Cap.IRQCHIP):
            return t.unreachable("needs an in-kernel LAPIC: this host has no KVM_CAP_IRQCHIP (checked now)")
    if len(allowed) < 2:
        return t.unreachable(f"needs two host CPUs for the vCPU thread: its affinity allows only {allowed}")
    home, away = allowed[0], allowed[1]
    with machine(irqchip="kernel") as (vm, vcpu), pinned(home):
        x86.load_code(vcpu, TIMER_GUEST)
        run_until(vcpu, t, is_port(PORT_READY))
        state = lapic.read(vcpu)
        mode = lapic.TimerMode(state.lvt["timer"].timer_mode or 0).name.lower()
        t.guest(f"LAPIC timer armed on CPU {home}: {mode}, initial count "
                f"{state.timer_initial:#x}, divide {state.timer_divide}, current count {state.timer_current:#x}")
        targets = [away if move % 2 == 0 else home for move in range(MOVES)]
        with t.trace("timer:hrtimer_start", "timer:hrtimer_cancel") as recording:
            for cpu in targets:
                if not control:
                    os.sched_setaffinity(0, {cpu})
                    t.host(f"sched_setaffinity: the vCPU thread moves to CPU {cpu} (the next KVM_RUN loads the "
                           "vCPU there: KVM raises KVM_REQ_MIGRATE_TIMER)")
                else:
                    t.host(f"the vCPU thread stays on CPU {home} (control)")
                run_until(vcpu, t, is_port(PORT_READY))
        if recording is None:
            t.outcome.evidence.update(traced=False)
            return t.verdict(False, f"needs trace events ({t.trace_problem})")
        started = recording.named("timer:hrtimer_start")
        address = None
        if any(isinstance(e.fields.get("function"), int) for e in started):
            address = kernel_address(TIMER_FUNCTION)
            if address is None:
                t.outcome.evidence.update(function_address=None)
                return t.verdict(False, f"this kernel traces hrtimer functions as addresses and /proc/kallsyms does "
                                        f"not show {TIMER_FUNCTION}'s (kptr_restrict): the LAPIC timer cannot be "
                                        "told apart")
            t.add("note", f"this kernel traces hrtimer functions as addresses: {TIMER_FUNCTION} is {address:#x} "
                          "(/proc/kallsyms)")
        starts = [e for e in started if runs_function(e, TIMER_FUNCTION, address)]
        cancelled = {e["hrtimer"] for e in recording.named("timer:hrtimer_cancel")}
        t.outcome.evidence.update(
            moves=targets if not control else [],
            function_address=address,
            restarts_on=[e.cpu for e in starts],
            cancelled_first=all(e["hrtimer"] in cancelled for e in starts),
            expiries=sorted({e["expires"] for e in starts}),
        )
        if starts:
            t.guest(f"{TIMER_FUNCTION}'s hrtimer started again on CPUs {[e.cpu for e in starts]}, "
                    f"expiry {'unchanged' if len({e['expires'] for e in starts}) == 1 else 'changed'}")
        seen = bool(starts) and (control or [e.cpu for e in starts] == targets)
        return t.verdict(seen, "hrtimer_start of apic_timer_fn on the new CPU, once per move")


REQUESTS = (
    request(
        "CLOCK_UPDATE",
        "KVM_SET_CLOCK, KVM_KVMCLOCK_CTRL, vCPU migration, TSC writes",
        "kvm_guest_time_update()",
        "guest enables kvmclock; KVM_SET_CLOCK +10 s; KVM_KVMCLOCK_CTRL",
        "the guest's kvmclock record (version +2, system_time +10 s, GUEST_STOPPED); trace kvm_pvclock_update",
        "The kvmclock page is the guest's clock: (tsc_timestamp, system_time, multiplier). KVM rewrites it, "
        "with the version odd while it does, whenever the mapping from TSC to time changes; "
        "KVM_REQ_CLOCK_UPDATE defers that write to the vCPU's own thread just before entry, where the TSC "
        "read and the guest's view agree.",
        OBSERVED,
        OBSERVED,
        intel=OBSERVED,
    ),
    request(
        "GLOBAL_CLOCK_UPDATE",
        "kvm_write_system_time() (guest write of MSR 0x4b564d01 or 0x12), kvm_arch_vcpu_load() (first load; "
        "a move to another host CPU when the master clock is off)",
        "kvm_gen_kvmclock_update(): CLOCK_UPDATE here, kvmclock_update_work 100 ms later for every vCPU",
        "two vCPUs with kvmclock on, idle for 0.3 s; vCPU 0's guest writes MSR 0x4b564d01 again",
        "vCPU 0's kvmclock record rewritten at once, vCPU 1's (which did nothing) ~100 ms later; "
        "trace kvm_pvclock_update for both, one kvm_msr",
        "A vCPU's kvmclock record is computed from its own view of the TSC; when one vCPU's clock is reset "
        "(the guest rewrites its kvmclock MSR, or the vCPU first runs or moves to another host CPU without "
        "a master clock), the other vCPUs' records must be refreshed too or the guest's vCPUs would disagree "
        "on the time. KVM marks this vCPU with KVM_REQ_GLOBAL_CLOCK_UPDATE (x86.c, kvm_write_system_time() "
        "and kvm_arch_vcpu_load()); vcpu_enter_guest() handles it with kvm_gen_kvmclock_update(), which "
        "raises KVM_REQ_CLOCK_UPDATE on this vCPU and schedules kvmclock_update_work, 100 ms later, to raise "
        "KVM_REQ_CLOCK_UPDATE on every vCPU and kick them. The delay batches the updates of many vCPUs "
        "that all come online or migrate at once.",
        OBSERVED,
        OBSERVED,
        intel=OBSERVED,
    ),
    request(
        "MASTERCLOCK_UPDATE",
        "kvm_write_system_time() (the boot vCPU switches between MSR 0x12 and 0x4b564d01), "
        "kvm_track_tsc_matching() (vCPU creation, IA32_TSC writes), host clocksource changes",
        "kvm_update_masterclock()",
        "guest writes MSR 0x12 then 0x4b564d01 on vCPU 0; host KVM_SET_MSRS IA32_TSC = TSC + 10 s",
        "trace kvm_update_master_clock (masterclock 0 then 1; after the TSC write, with kvm_track_tsc); "
        "the kvmclock record's PVCLOCK_TSC_STABLE 1->0->1 where the host clock is the TSC",
        "With a master clock, KVM keeps one (host TSC, nanoseconds) snapshot for the whole VM and derives "
        "every vCPU's kvmclock from it, so the guest's clock is monotonic across vCPUs and the records say "
        "so (PVCLOCK_TSC_STABLE). KVM can only do this while the host clock is the TSC, all vCPUs' TSCs "
        "match and the boot vCPU uses the current kvmclock MSR; when one of these may have changed it "
        "raises KVM_REQ_MASTERCLOCK_UPDATE: kvm_write_system_time() when vCPU 0 switches MSR ABI, "
        "kvm_track_tsc_matching() when a TSC write starts a new generation, the clocksource notifier. "
        "vcpu_enter_guest() handles it with kvm_update_masterclock(): block entries of all vCPUs, take a "
        "new snapshot and decide whether the master clock is usable, then KVM_REQ_CLOCK_UPDATE on each vCPU.",
        OBSERVED,
        OBSERVED,
        intel=OBSERVED,
    ),
    request(
        "STEAL_UPDATE",
        "vCPU load (kvm_arch_vcpu_load), guest write of MSR_KVM_STEAL_TIME",
        "record_steal_time()",
        "guest writes MSR 0x4b564d03 = record | enable",
        "the steal-time record's version +2 per KVM_RUN",
        "Tells the guest how long its vCPU was runnable but not running (host run-queue delay): KVM raises "
        "the request each time the vCPU is loaded on a host CPU and writes the record before entering.",
        OBSERVED,
        OBSERVED,
        intel=OBSERVED,
    ),
    request(
        "MIGRATE_TIMER",
        "kvm_arch_vcpu_load() when the vCPU is loaded on a host CPU other than its last one",
        "__kvm_migrate_timers(): __kvm_migrate_apic_timer(), the PIT's timer, the vendor's timers",
        "in-kernel LAPIC one-shot timer armed minutes ahead; sched_setaffinity moves the vCPU thread to the "
        "other CPU between runs, 4 times",
        "trace timer:hrtimer_cancel then hrtimer_start of apic_timer_fn on the new CPU, once per move, same expiry",
        "KVM emulates the LAPIC timer (and the PIT) with host hrtimers, which fire on the CPU that started "
        "them. When the vCPU thread runs on another host CPU, kvm_arch_vcpu_load() raises "
        "KVM_REQ_MIGRATE_TIMER, and before the next entry __kvm_migrate_timers() cancels each armed timer and "
        "starts it again, same expiry, on the new CPU, so the expiry interrupts the CPU the vCPU is on and "
        "the timer interrupt is not delayed by a cross-CPU wakeup. Timers KVM can post without an hrtimer "
        "(posted timer interrupts, a VMX preemption timer) are left alone. The events' function field is "
        "the symbol on kvm_pvm's kernel and an address on kvm_amd's (Debian 6.12), resolved in /proc/kallsyms.",
        OBSERVED,
        OBSERVED,
        intel=UNREACHABLE,
    ),
)
SCENARIOS: dict[str, Callable[..., ScenarioResult]] = {
    "CLOCK_UPDATE": clock_update,
    "GLOBAL_CLOCK_UPDATE": global_clock_update,
    "MASTERCLOCK_UPDATE": masterclock_update,
    "STEAL_UPDATE": steal_update,
    "MIGRATE_TIMER": migrate_timer,
}
