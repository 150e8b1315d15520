"""The same vector through five delivery paths, to a vCPU in three states, timed and counted.

Why this exists: a VMM can kick a vCPU out of the guest to inject from
userspace, or let the kernel deliver while the vCPU runs; the two differ in
cost and in who decides the moment of injection, and which is faster depends
on what the target vCPU is doing. This module makes that concrete for the demo
and the benchmark, which both call :func:`compare` with the same
:data:`PACING`: for each target state and path it delivers one vector many
times to a long-mode guest and measures

* latency: host TSC just before the inject call to the TSC the guest's vector
  stub reads two instructions after the delivery, minus the guest TSC offset
  measured for that vCPU by :func:`guest_tsc_offset` (printed with its
  uncertainty);
* host round trip: the same send to the moment the injecting thread sees the
  guest's log count move, host clock only, which cross-checks the latency:
  every guest stamp must fall between the two host stamps;
* exits per interrupt: the target vCPU's ``exits`` counter from the stats fd.

Injections are paced: a random gap (:class:`Pacing`, seeded) separates one
delivery from the next send, so an injection lands at a random point of what
the vCPU is doing (kvm_pvm notices interrupts only at the end of a batch of
emulated instructions; sending right after the previous delivery would land
every injection just after such a boundary).

Paths: ``kick`` (userspace irqchip: ``KVM_INTERRUPT`` at the next entry, the
vCPU kicked out with a signal), ``irq_line`` (``KVM_IRQ_LINE`` through the
IOAPIC), ``msi`` (``KVM_SIGNAL_MSI``), ``irqfd`` (eventfd written from another
thread) and ``ipi`` (another vCPU writes its ICR). States: :data:`STATES`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import statistics
import threading
import time
from collections.abc import Callable, Iterator

from .. import guests
from ..core.binding import ffi, lib
from ..core.errors import PyKvmError
from ..core.exits import IntrExit
from ..core.interrupts import MsiMessage, MsiRoute
from ..guests import Command, GuestSession, StopKind, protocol
from ..irqchip import UserspaceIrqController, ioapic, lapic
from ..runtime import VcpuThread
from ..runtime.cpu_wait import CpuFairDeadline
from ..x86.modes import RFLAGS_IF
from .limits import explain_exit

VECTOR = 0x61
FOREVER = 2**32 - 1            # SPIN iterations / WAIT_LOG count that never run out
IOAPIC_PIN = 19            # >= 16: an IOAPIC-only GSI (0-15 also reach the 8259s)
IRQFD_GSI = 100
DELIVERY_TIMEOUT = 1.0          # seconds one interrupt may take before the path is declared broken
POLL_INTERVAL = 20e-6          # seconds between looks at the guest log while waiting
TSC_BRACKETS = 200             # host-rdtsc brackets around a guest rdtsc, per target vCPU
CHECK_MARGIN_NS = 1000.0       # slack of the host-clock check beyond the offset's uncertainty

PATHS: dict[str, str] = {
    "kick": "userspace: kick + KVM_INTERRUPT",
    "irq_line": "KVM_IRQ_LINE via IOAPIC",
    "msi": "KVM_SIGNAL_MSI",
    "irqfd": "irqfd (eventfd write, another thread)",
    "ipi": "IPI from another vCPU",
}

STATES: dict[str, str] = {
    "spinning": "(a) spinning with IF=1, on another CPU than the injector",
    "halted": "(b) halted (sti; hlt), on another CPU than the injector",
    "same_cpu": "(c) spinning with IF=1, pinned to the injector's CPU",
}
STATE_SHORT = {"spinning": "(a) spinning on another CPU", "halted": "(b) halted on another CPU",
               "same_cpu": "(c) on the injector's CPU"}
STATE_NOTES = {
    "halted": "halted: the in-kernel irqchip paths' vCPU waits in sti; hlt inside KVM_RUN (WAIT_LOG). "
              "With the userspace irqchip\n(kick) a hlt exits to userspace (KVM_EXIT_HLT): there the "
              "vCPU thread waits for a wake-up, and the\n\"kick\" is queue + wake that thread, which "
              "injects with KVM_INTERRUPT and re-enters (no signal).",
}


@dataclasses.dataclass(frozen=True)
class Pacing:
    """Random gaps between one delivery and the next send, reproducible from ``seed``."""

    min_gap_s: float = 0.2e-3
    max_gap_s: float = 2e-3
    seed: int = 1

    def gaps(self, *key: object) -> Iterator[float]:
        """The gap sequence of one measurement (``key``: path, state, round): seeded, endless."""
        rng = random.Random(":".join(map(str, (self.seed, *key))))
        while True:
            yield rng.uniform(self.min_gap_s, self.max_gap_s)

    def describe(self) -> str:
        return (f"paced: each send waits a gap drawn uniformly from {self.min_gap_s * 1e3:g}-"
                f"{self.max_gap_s * 1e3:g} ms after the previous delivery (seed {self.seed}, "
                f"with path, state and round)")


PACING = Pacing()          # what the demo and the benchmark both use


TABLE_HEADER = (f"{'path':38} {'impl':6} {'irq/s':>7} {'p50 us':>8} {'p99 us':>8} {'host p50':>8} "
                f"{'exits/irq':>9} {'sig/irq':>7} {'inj/irq':>7} {'hlt/irq':>7}")
TABLE_LEGEND = ("p50/p99 us: host TSC before the inject call -> TSC read by the guest's vector stub, "
                "minus the guest TSC offset;\nhost p50: host clock only, the same send -> the injector "
                "sees the guest's log count move (polling every\n~20 us, plus the handler's ~35 "
                "instructions after its rdtsc);\nirq/s: deliveries per second of injector time (send -> "
                "seen), the pacing gaps left out;\nexits/irq: the target vCPU's `exits` counter (stats "
                "fd) per interrupt over the whole run, gaps and in-kernel\nexits included; sig/irq: its "
                "`signal_exits` (KVM_RUN left for a signal: the userspace kick); inj/irq: its "
                "`irq_injections`;\nhlt/irq: its `halt_exits` (the guest's hlt, in the kernel or to "
                "userspace): ~1 when halted, ~0 when spinning")

def tsc_warning(results: list[PathMeasurement]) -> list[str]:
    """Warnings: latencies that came out negative (host and guest TSC disagree), interrupts delivered twice."""
    negative = sum(result.negative_latencies for result in results)
    total = sum(result.count for result in results)
    twice = sum(result.counters.get("duplicate_deliveries", 0) for result in results)
    lines = [f"warning: the guest logged {twice} deliveries more than the {total} interrupts sent (an",
             "interrupt taken twice; seen under QEMU TCG); each latency pairs a send with the first record",
             "after it"] if twice else []
    if not negative:
        return lines
    return lines + [f"warning: {negative} of {total} latencies are negative: the guest's TSC and the host's",
            "disagree here (seen under QEMU TCG, where each emulated CPU keeps its own TSC), so the",
            "latency columns are not meaningful on this host; rates, host round trips and counters still are"]


# The target vCPU's stats-fd counters recorded over each path's deliveries.
COUNTERS = ("exits", "signal_exits", "irq_injections", "irq_window_exits", "halt_exits")


@dataclasses.dataclass(frozen=True)
class TscOffset:
    """Guest TSC minus host TSC for one vCPU: the middle of the interval every bracket allows.

    Each bracket is host rdtsc, a ``KVM_RUN`` in which the guest's first
    instruction is ``rdtsc`` and its second exits, host rdtsc: the guest's
    reading minus the offset lies between the two host readings. Every bracket
    therefore confines the offset to an interval, and all of them must contain
    it: the offset is the middle of their intersection, ``uncertainty`` half its
    width (no wider than half the tightest bracket). ``consistent`` is False
    when the intervals have no common point (the guest TSC drifts against the
    host's, as under QEMU TCG); then the tightest bracket alone is used.
    """

    cycles: float
    uncertainty_cycles: float
    brackets: int
    tightest_cycles: int
    tsc_hz: int
    consistent: bool = True

    @property
    def ns(self) -> float:
        return self.cycles * 1e9 / self.tsc_hz

    @property
    def uncertainty_ns(self) -> float:
        return self.uncertainty_cycles * 1e9 / self.tsc_hz

    def describe(self) -> str:
        text = (f"guest TSC - host TSC = {self.ns / 1000:+.2f} +- {self.uncertainty_ns / 1000:.2f} us "
                f"({self.cycles:+.0f} +- {self.uncertainty_cycles:.0f} cycles; {self.brackets} brackets, "
                f"tightest {self.tightest_cycles * 1e6 / self.tsc_hz:.2f} us)")
        return text if self.consistent else text + "; the brackets disagree: the TSCs drift apart"


def guest_tsc_offset(session: GuestSession, brackets: int = TSC_BRACKETS) -> TscOffset:
    """Measure guest TSC - host TSC on ``session``'s vCPU, stopped at a sync point; leaves it there.

    The vCPU runs the image's ``tsc_probe`` (``rdtsc`` then ``out``) once per
    bracket, from C (``pykvm_bench_run_loop``) between two host rdtsc; its
    registers are saved first and restored after.
    """
    vcpu = session.vcpu
    _finish_exit(vcpu)                   # the sync point's `out`: step RIP past it
    saved = vcpu.regs
    vcpu.regs = dataclasses.replace(saved, rip=session.address("tsc_probe"),
                                    rflags=saved.rflags & ~RFLAGS_IF)
    low, high, tightest = float("-inf"), float("inf"), (0, 0)
    run_loop, rdtsc, fd, run = lib.pykvm_bench_run_loop, lib.pykvm_rdtsc, vcpu.fd, vcpu._run
    try:
        for index in range(brackets):
            before = rdtsc()
            done = run_loop(fd, run, 1, protocol.PORT_SYNC)
            after = rdtsc()
            if done != 1:
                raise PyKvmError(f"the TSC probe on vCPU {vcpu.id} stopped with {done} instead of an "
                                 f"`out` to port {protocol.PORT_SYNC:#x}")
            regs = vcpu.regs
            guest = (regs.rdx & 0xFFFFFFFF) << 32 | (regs.rax & 0xFFFFFFFF)
            low, high = max(low, guest - after), min(high, guest - before)
            if index == 0 or after - before < tightest[0]:
                tightest = (after - before, guest - (before + after) / 2)
        _finish_exit(vcpu)
    finally:
        vcpu.regs = saved
    tsc_hz = vcpu.tsc_khz * 1000
    if low <= high:
        return TscOffset((low + high) / 2, (high - low) / 2, brackets, tightest[0], tsc_hz)
    return TscOffset(tightest[1], tightest[0] / 2, brackets, tightest[0], tsc_hz, consistent=False)


def _finish_exit(vcpu) -> None:
    """Let KVM complete the `out` behind the last exit without running the guest (immediate_exit)."""
    vcpu.kvm_run.immediate_exit = 1
    exit = vcpu.run()
    if not isinstance(exit, IntrExit):
        raise PyKvmError(f"vCPU {vcpu.id}: completing an exit with immediate_exit gave {exit}")


@dataclasses.dataclass
class PathMeasurement:
    """One path's deliveries to one target state: latencies and host round trips (ns), counters."""

    path: str
    state: str
    latencies_ns: list[float]
    round_trips_ns: list[float]
    counters: dict[str, int]
    implementation: str = "python"
    offsets: list[TscOffset] = dataclasses.field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.latencies_ns)

    def per_interrupt(self, counter: str) -> float:
        """A stats-fd counter's change divided by the interrupts delivered."""
        return self.counters[counter] / self.count

    @property
    def exits_per_interrupt(self) -> float:
        return self.per_interrupt("exits")

    @classmethod
    def merge(cls, runs: list[PathMeasurement]) -> PathMeasurement:
        """Several rounds of one path, state and implementation as one measurement."""
        return cls(runs[0].path, runs[0].state, [lat for run in runs for lat in run.latencies_ns],
                   [rt for run in runs for rt in run.round_trips_ns],
                   {name: sum(run.counters[name] for run in runs) for name in runs[0].counters},
                   runs[0].implementation, [offset for run in runs for offset in run.offsets])

    @property
    def negative_latencies(self) -> int:
        """Deliveries the guest stamped before the host's send: the two TSCs disagree."""
        return sum(latency < 0 for latency in self.latencies_ns)

    @property
    def uncertainty_ns(self) -> float:
        """The widest TSC-offset uncertainty behind these latencies."""
        return max((offset.uncertainty_ns for offset in self.offsets), default=0.0)

    def outside_host_bracket(self, margin_ns: float = CHECK_MARGIN_NS) -> int:
        """Deliveries whose guest stamp falls outside [send, seen] by more than uncertainty + margin.

        The guest stamps its handler before it publishes the log record, and the
        injector sees the record after that, so with a right offset every latency
        lies between 0 and the host round trip.
        """
        slack = self.uncertainty_ns + margin_ns
        return sum(not -slack <= latency <= round_trip + slack
                   for latency, round_trip in zip(self.latencies_ns, self.round_trips_ns, strict=True))

    def row(self) -> str:
        """One line of the table whose header is :data:`TABLE_HEADER`."""
        return (f"{PATHS[self.path]:38} {self.implementation:6} {self.rate:7.0f} {self.p50_us:8.1f} "
                f"{self.p99_us:8.1f} {self.host_p50_us:8.1f} {self.exits_per_interrupt:9.2f} "
                f"{self.per_interrupt('signal_exits'):7.2f} {self.per_interrupt('irq_injections'):7.2f} "
                f"{self.per_interrupt('halt_exits'):7.2f}")

    @property
    def rate(self) -> float:
        """Interrupts per second of injector time (send -> seen), the pacing gaps left out."""
        return self.count / (sum(self.round_trips_ns) / 1e9)

    @property
    def p50_us(self) -> float:
        return statistics.median(self.latencies_ns) / 1000

    @property
    def p99_us(self) -> float:
        if len(self.latencies_ns) < 2:
            return self.latencies_ns[0] / 1000
        return statistics.quantiles(self.latencies_ns, n=100, method="inclusive")[98] / 1000

    @property
    def host_p50_us(self) -> float:
        return statistics.median(self.round_trips_ns) / 1000


def _cpu_split(state: str) -> tuple[set[int], set[int]] | None:
    """(injector CPUs, target vCPU CPUs) for ``state``, or None with a single CPU and ``same_cpu``.

    The injector takes the first CPU this process may use; the target vCPU the
    last one, or the injector's own for ``same_cpu``. Left to the scheduler,
    the two threads sometimes share a CPU and sometimes not, which mixes two
    different cases (on kvm_pvm a kernel path's kick finds a vCPU that is not
    running much faster).
    """
    cpus = sorted(os.sched_getaffinity(0))
    if state == "same_cpu":
        return ({cpus[0]}, {cpus[0]}) if len(cpus) >= 2 else None
    if len(cpus) < 2:
        raise PyKvmError(f"state {state!r} needs two CPUs (this process may use {len(cpus)})")
    return ({cpus[0]}, {cpus[-1]})


@contextlib.contextmanager
def _pinned_injector(split: tuple[set[int], set[int]] | None):
    """Run the calling (injecting) thread on the injector CPU for the block, then restore it."""
    if split is None:
        yield
        return
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, split[0])
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)


class _Target:
    """A long-mode guest on a VM of the path's irqchip mode, in ``state``, run by its own thread."""

    def __init__(self, kvm, path: str, state: str = "spinning") -> None:
        if state not in STATES:
            raise ValueError(f"unknown target state {state!r}; choose one of {', '.join(STATES)}")
        self.path = path
        self.state = state
        self.split = _cpu_split(state)
        irqchip = "none" if path == "kick" else "kernel"
        self.command = Command.WAIT_LOG if state == "halted" else Command.SPIN
        # the halted userspace-irqchip vCPU waits for this in userspace after its HLT exit
        self.wake = threading.Event() if (path, state) == ("kick", "halted") else None
        self.vm = kvm.create_vm(irqchip=irqchip)
        try:
            sessions = guests.boot_cpus(self.vm, "long", cpus=2 if path == "ipi" else 1, explain=explain_exit)
            self.sender: GuestSession | None = sessions[0] if path == "ipi" else None
            self.session: GuestSession = sessions[-1]
            self.vcpu = self.session.vcpu
            self.controller = UserspaceIrqController(self.vcpu) if path == "kick" else None
            if irqchip == "kernel":
                for session in sessions:
                    session.apic_enable()
            self.session.command(Command.STI)
            self.tsc_hz = self.vcpu.tsc_khz * 1000
            self.offset = guest_tsc_offset(self.session)
            # KVM_GET_STATS_FD is a vCPU ioctl: it would wait for the vCPU mutex, which a
            # vCPU spinning inside KVM_RUN with no exits never releases. Open it now.
            self.stats = self.vcpu.stats
            self.session.send(self.command, FOREVER)
            self.thread = VcpuThread(self.vcpu, self._run)
        except BaseException:
            self.vm.close()
            raise

    def _run(self, stopping: threading.Event) -> None:
        if self.split:
            os.sched_setaffinity(0, self.split[1])       # this thread only
        session = self.session
        while not stopping.is_set():
            stop = session.run()
            if stop.kind == StopKind.SYNC:            # the spin / wait ended: again
                session.send(self.command, FOREVER)
            elif stop.kind == StopKind.HLT and self.wake is not None:
                while not self.wake.wait(0.05):      # a userspace halt: wait to be woken
                    if stopping.is_set():
                        return
                self.wake.clear()
            elif stop.kind not in (StopKind.KICKED, StopKind.HLT, StopKind.VECTOR, StopKind.WINDOW):
                raise PyKvmError(f"path {self.path}: unexpected stop {stop.describe()}")

    @property
    def log_count(self) -> int:
        return self.session.log_count()

    def wait_for(self, count: int) -> int:
        """Wait until the guest's log holds ``count`` records; the host TSC when it was seen.

        The interrupt has :data:`DELIVERY_TIMEOUT` seconds, plus the time this process's threads
        spent waiting for a CPU meanwhile (a loaded host: the vCPU thread to kick was not running).
        """
        deadline = CpuFairDeadline(DELIVERY_TIMEOUT)
        while self.session.log_count() < count:
            # Sleep rather than spin: the kick path's vCPU thread needs the GIL to take its
            # EINTR exit and inject, and a spinning waiter would hold it for the whole 5 ms
            # switch interval.
            time.sleep(POLL_INTERVAL)
            if deadline.expired():
                raise PyKvmError(f"path {self.path}, {self.state}: interrupt {count} not delivered "
                                 f"within {deadline.describe()}")
        return lib.pykvm_rdtsc()

    @contextlib.contextmanager
    def deliveries(self):
        """The injecting block: the caller's thread pinned as the state says, and the
        vCPU's :data:`COUNTERS` counted over it (yields the stats delta)."""
        with _pinned_injector(self.split), self.stats.delta(*COUNTERS) as counters:
            yield counters

    def measurement(self, sent: list[int], seen: list[int], positions: list[int], first_record: int,
                    counters, implementation: str = "python") -> PathMeasurement:
        """Pair each send with the first record written after it; count the records no send explains."""
        logged = {record.seq: record for record in self.session.records_since(first_record)}
        records = [logged.get(position) for position in positions]
        if any(record is None or record.vector != VECTOR for record in records):
            seen_vectors = sorted({hex(record.vector) for record in logged.values()})
            raise PyKvmError(f"{self.path}: a send of {VECTOR:#x} has no record of it after it in the "
                             f"guest log (vectors logged: {', '.join(seen_vectors) or 'none'})")
        counters = {name: counters[name] for name in COUNTERS}
        counters["duplicate_deliveries"] = sum(r.vector == VECTOR for r in logged.values()) - len(sent)
        scale = 1e9 / self.tsc_hz
        latencies = [(record.tsc - self.offset.cycles - stamp) * scale  # type: ignore[union-attr]
                     for record, stamp in zip(records, sent, strict=True)]
        round_trips = [(back - stamp) * scale for stamp, back in zip(sent, seen, strict=True)]
        return PathMeasurement(self.path, self.state, latencies, round_trips, counters, implementation,
                               [self.offset])

    def close(self) -> None:
        try:
            if self.wake is not None:
                self.wake.set()
            self.thread.cancel()
        finally:
            self.vm.close()


def _injector(target: _Target) -> Callable[[], None]:
    """The Python call that makes one interrupt for ``target.path``."""
    vm = target.vm
    if target.path == "kick":
        controller, wake = target.controller, target.wake
        assert controller is not None        # the kick target has one

        def kick() -> None:
            controller.queue(VECTOR)
            target.vcpu.kick()

        if wake is None:
            return kick

        def wake_up() -> None:                # halted: the vCPU thread waits in userspace
            controller.queue(VECTOR)
            wake.set()
        return wake_up
    if target.path == "irq_line":
        target_pin = IOAPIC_PIN
        _route_ioapic_pin(target, target_pin)

        def irq_line() -> None:
            vm.irq_line(target_pin, 1)
            vm.irq_line(target_pin, 0)
        return irq_line
    if target.path == "msi":
        message = MsiMessage.compose(destination=target.vcpu.id, vector=VECTOR)
        return lambda: vm.signal_msi(message)
    if target.path == "irqfd":
        vm.set_gsi_routing(vm.routes + (MsiRoute(IRQFD_GSI, MsiMessage.compose(
            destination=target.vcpu.id, vector=VECTOR)),))
        return vm.irqfd(IRQFD_GSI).trigger
    if target.path == "ipi":
        icr = lapic.icr(VECTOR, destination=target.vcpu.id)
        sender = target.sender
        assert sender is not None            # the IPI target has one
        return lambda: sender.apic_write(lapic.ApicReg.ICR_LOW, icr)
    raise ValueError(f"unknown delivery path {target.path!r}; choose one of {', '.join(PATHS)}")


def _route_ioapic_pin(target: _Target, pin: int) -> None:
    """Program the IOAPIC pin from the host side (KVM_SET_IRQCHIP): edge, fixed, to the target."""
    entry = ioapic.RedirectionEntry(vector=VECTOR, destination=target.vcpu.id)
    ioapic.write(target.vm, ioapic.read(target.vm).with_entry(pin, entry))


def _paced(target: _Target, count: int, pacing: Pacing, round_index: int,
           send: Callable[[], int]) -> tuple[list[int], list[int], list[int]]:
    """``count`` paced deliveries: ``send()`` makes one and returns its host TSC; each is waited for.

    Returns the host TSC of every send and of the moment its log record was seen,
    and the log position each send's record took (the first record after the send:
    a host that delivers one interrupt twice adds records no send is paired with).
    """
    gaps = pacing.gaps(target.path, target.state, round_index)
    sent: list[int] = []
    seen: list[int] = []
    positions: list[int] = []
    for _ in range(count):
        time.sleep(next(gaps))
        before = target.log_count
        sent.append(send())
        positions.append(before)
        seen.append(target.wait_for(before + 1))
    return sent, seen, positions


def measure(kvm, path: str, state: str = "spinning", count: int = 200, pacing: Pacing = PACING,
            round_index: int = 0) -> PathMeasurement:
    """Deliver ``count`` paced interrupts one at a time through ``path`` to a target in ``state``.

    Each is waited for in the guest's log. The injecting thread is the
    caller's; the target vCPU runs in its own thread, so every path (irqfd
    included) comes from outside the vCPU thread.
    """
    target = _Target(kvm, path, state)
    try:
        inject = _injector(target)
        rdtsc = lib.pykvm_rdtsc

        def send() -> int:
            stamp = rdtsc()
            inject()
            return stamp
        first = target.log_count
        with target.deliveries() as counters:
            sent, seen, positions = _paced(target, count, pacing, round_index, send)
        return target.measurement(sent, seen, positions, first, counters)
    finally:
        target.close()


C_PATHS = ("msi", "irqfd")     # the paths the C injector drives


def measure_c_baseline(kvm, path: str, state: str = "spinning", count: int = 200,
                       pacing: Pacing = PACING, round_index: int = 0) -> PathMeasurement:
    """The ``msi`` / ``irqfd`` path driven by the C injector (``pykvm_bench_inject``), same guest setup.

    Paced like :func:`measure`: the C injector sends one interrupt per call
    (stamping the host TSC itself) and waits for it; the gap is slept in Python.
    """
    if path not in C_PATHS:
        raise ValueError("the C injector covers the msi and irqfd paths")
    target = _Target(kvm, path, state)
    try:
        message = MsiMessage.compose(destination=target.vcpu.id, vector=VECTOR)
        msi = ffi.new("struct kvm_msi *", {"address_lo": message.address_lo,
                                           "address_hi": message.address_hi, "data": message.data})
        if path == "irqfd":
            target.vm.set_gsi_routing(target.vm.routes + (MsiRoute(IRQFD_GSI, message),))
            kind, fd = 1, target.vm.irqfd(IRQFD_GSI).fd
        else:
            kind, fd = 0, target.vm.fd
        log_count = ffi.cast("volatile unsigned int *",
                             target.vm.memory.host_pointer(target.session.area.log, 4))
        stamp = ffi.new("unsigned long long[]", 1)
        timeout = int(DELIVERY_TIMEOUT * target.tsc_hz)
        poll_ns = int(POLL_INTERVAL * 1e9)

        def send() -> int:
            # one interrupt, sent and waited for in C; wait_for() then finds it already logged
            done = lib.pykvm_bench_inject(kind, fd, msi, log_count, 1, stamp, timeout, poll_ns)
            if done != 1:
                raise PyKvmError(f"C injector, path {path}: interrupt not delivered ({done})")
            return stamp[0]
        first = target.log_count
        with target.deliveries() as counters:
            sent, seen, positions = _paced(target, count, pacing, round_index, send)
        return target.measurement(sent, seen, positions, first, counters, "c")
    finally:
        target.close()


@dataclasses.dataclass
class Comparison:
    """Every path in every state (and the C baselines, if asked), rounds merged, with the failures."""

    results: list[PathMeasurement]
    failures: list[tuple[str, str, str]]        # (state, path, error)
    count: int
    rounds: int
    pacing: Pacing

    def get(self, state: str, path: str, implementation: str = "python") -> PathMeasurement | None:
        return next((r for r in self.results if (r.state, r.path, r.implementation)
                     == (state, path, implementation)), None)

    def report(self) -> list[str]:
        """The table per state, the legend, the TSC offset and the host-clock check, the conclusions."""
        lines = [TABLE_HEADER]
        for state, title in STATES.items():
            lines.append(title)
            lines += [r.row() for r in self.results if r.state == state]
            lines += [f"{PATHS[path]:38} failed: {error}" for where, path, error in self.failures
                      if where == state]
        lines += TABLE_LEGEND.splitlines() + STATE_NOTES["halted"].splitlines()
        lines += [f"host: {_host_conditions()}; {self.pacing.describe()}"]
        lines += self.offset_lines() + tsc_warning(self.results)
        lines += conclusions(self.results)
        return [line for text in lines for line in text.splitlines()]

    def offset_lines(self) -> list[str]:
        offsets = [offset for result in self.results for offset in result.offsets]
        if not offsets:
            return []
        widest = max(offsets, key=lambda offset: offset.uncertainty_ns)
        inconsistent = sum(not offset.consistent for offset in offsets)
        lines = [f"TSC offset, measured per target vCPU ({len(offsets)} vCPUs; host rdtsc, a KVM_RUN whose "
                 f"first guest\ninstruction is rdtsc and whose second exits, host rdtsc; the intersection "
                 f"of {widest.brackets} such brackets):",
                 f"median {statistics.median(o.ns for o in offsets) / 1000:+.2f} us, range "
                 f"{min(o.ns for o in offsets) / 1000:+.2f} to {max(o.ns for o in offsets) / 1000:+.2f} us; "
                 f"uncertainty (half the interval) at most {widest.uncertainty_ns / 1000:.2f} us"
                 + (f"; {inconsistent} vCPUs' brackets disagree (drifting TSCs)" if inconsistent else "")]
        total = sum(r.count for r in self.results)
        outside = sum(r.outside_host_bracket() for r in self.results)
        lines.append(f"host-clock check: {total - outside} of {total} guest stamps lie between their send "
                     f"and the injector seeing the record\n(host clock only), within the offset's "
                     f"uncertainty + {CHECK_MARGIN_NS / 1000:g} us")
        return lines


def _host_conditions() -> str:
    cpus = sorted(os.sched_getaffinity(0))
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return (f"{len(cpus)} CPUs usable ({', '.join(map(str, cpus))}); injector pinned to CPU {cpus[0]}, "
            f"target vCPU to CPU {cpus[-1]} ((a), (b)) or {cpus[0]} ((c)); load average {load} "
            f"(other processes share these CPUs)")


def compare(kvm, count: int, rounds: int = 1, c_baseline: bool = False, pacing: Pacing = PACING,
            states: tuple[str, ...] = tuple(STATES), paths: tuple[str, ...] = tuple(PATHS)) -> Comparison:
    """Measure every path in every state ``rounds`` times (C baselines interleaved if asked).

    The demo and the benchmark both call this (the benchmark with more
    interrupts, more rounds and the C baselines), so their numbers come from
    the same code with the same pacing.
    """
    runs: dict[tuple[str, str, str], list[PathMeasurement]] = {}
    failures: dict[tuple[str, str], str] = {}
    for round_index in range(rounds):
        for state in states:
            for path in paths:
                if (state, path) in failures:
                    continue
                try:
                    runs.setdefault((state, path, "python"), []).append(
                        measure(kvm, path, state, count, pacing, round_index))
                    if c_baseline and path in C_PATHS:
                        runs.setdefault((state, path, "c"), []).append(
                            measure_c_baseline(kvm, path, state, count, pacing, round_index))
                except PyKvmError as exc:
                    failures[state, path] = str(exc)
    results = [PathMeasurement.merge(measured) for key, measured in runs.items()
               if measured and (key[0], key[1]) not in failures]
    return Comparison(results, [(state, path, error) for (state, path), error in failures.items()],
                      count, rounds, pacing)


NOISE = 0.10       # relative p50 difference below which two paths count as equal


def _relation(a: float, b: float) -> str:
    """How ``a`` compares with ``b`` ("faster than", "slower than", "about equal to")."""
    if abs(a - b) <= NOISE * max(a, b):
        return "about equal to"
    return "faster than" if a < b else "slower than"


def conclusions(results: list[PathMeasurement]) -> list[str]:
    """What the measured p50s say, per state; derived from the numbers, never a fixed sentence."""
    lines = [f"conclusions (p50 latency; differences under {NOISE:.0%} count as equal):"]
    best_state: dict[str, tuple[float, str]] = {}
    for state in STATES:
        measured = sorted((r for r in results if r.state == state and r.implementation == "python"),
                          key=lambda r: r.p50_us)
        if not measured:
            continue
        fastest, slowest = measured[0], measured[-1]
        text = (f"{STATE_SHORT[state]}: fastest {fastest.path} {fastest.p50_us:.0f} us, slowest "
                f"{slowest.path} {slowest.p50_us:.0f} us")
        kick = next((r for r in measured if r.path == "kick"), None)
        kernel = [r for r in measured if r.path != "kick"]
        if kick and kernel:
            low, high = kernel[0].p50_us, kernel[-1].p50_us
            faster = sum(_relation(r.p50_us, kick.p50_us) == "faster than" for r in kernel)
            slower = sum(_relation(r.p50_us, kick.p50_us) == "slower than" for r in kernel)
            text += (f"; the kernel paths ({low:.0f}-{high:.0f} us) against the kick ({kick.p50_us:.0f} us): "
                     f"{faster} faster, {slower} slower, {len(kernel) - faster - slower} about equal")
        lines.append(text)
        for r in measured:
            if r.path not in best_state or r.p50_us < best_state[r.path][0]:
                best_state[r.path] = (r.p50_us, state)
    if len(lines) > 2:
        by_state: dict[str, list[str]] = {}
        for path, (_, state) in best_state.items():
            by_state.setdefault(state, []).append(path)
        lines.append("the state in which each path was fastest: " + "; ".join(
            f"{', '.join(paths)} in {STATE_SHORT[state]}" for state, paths in by_state.items()))
    return lines
