"""The same vector through five delivery paths, timed and counted.

Why this exists: a VMM can kick a vCPU out of the guest to inject from
userspace, or let the kernel deliver while the vCPU runs; the two differ in
cost and in who decides the moment of injection. This module makes that concrete for the demo and the benchmark:
for each path it delivers one vector many times to a long-mode guest that
spins with interrupts on, and measures

* latency: host TSC just before the inject call to the guest handler's own
  ``rdtsc`` (the guest TSC offset is measured and removed first);
* exits per interrupt: the target vCPU's ``exits`` counter from the stats fd.

Paths: ``kick`` (signal + immediate_exit, then ``KVM_INTERRUPT`` at the
``EINTR`` exit), ``irq_line`` (``KVM_IRQ_LINE`` through the IOAPIC),
``msi`` (``KVM_SIGNAL_MSI``), ``irqfd`` (eventfd written from another
thread) and ``ipi`` (another vCPU writes its ICR).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import threading
import time
from collections.abc import Callable

from . import guests
from .core.binding import ffi, lib
from .core.errors import PyKvmError
from .core.interrupts import MsiMessage, MsiRoute
from .guests import Command, GuestSession, StopKind
from .irqchip import UserspaceIrqController, ioapic, lapic
from .runtime import VcpuThread

VECTOR = 0x61
SPIN_FOREVER = 2**32 - 1
IOAPIC_PIN = 19            # >= 16: an IOAPIC-only GSI (0-15 also reach the 8259s)
IRQFD_GSI = 100
DELIVERY_TIMEOUT = 1.0          # seconds one interrupt may take before the path is declared broken
IA32_TSC = 0x10
POLL_INTERVAL = 20e-6          # seconds between looks at the guest log while waiting

PATHS: dict[str, str] = {
    "kick": "userspace: kick + KVM_INTERRUPT",
    "irq_line": "KVM_IRQ_LINE via IOAPIC",
    "msi": "KVM_SIGNAL_MSI",
    "irqfd": "irqfd (eventfd write, another thread)",
    "ipi": "IPI from another vCPU",
}


TABLE_HEADER = (f"{'path':38} {'impl':6} {'irq/s':>7} {'p50 us':>8} {'p99 us':>8} "
                f"{'exits/irq':>9} {'sig/irq':>9} {'inj/irq':>9}")
TABLE_LEGEND = ("exits/irq: the target vCPU's `exits` counter (stats fd) per interrupt, in-kernel "
                "exits included;\nsig/irq: its `signal_exits` (KVM_RUN left for a signal: the userspace "
                "kick); inj/irq: its `irq_injections`")

def tsc_warning(results: list[PathMeasurement]) -> list[str]:
    """A warning when latencies came out negative (host and guest TSC disagree), else nothing."""
    negative = sum(result.negative_latencies for result in results)
    if not negative:
        return []
    total = sum(result.count for result in results)
    return [f"warning: {negative} of {total} latencies are negative: the guest's TSC and the host's",
            "disagree here (seen under QEMU TCG, where each emulated CPU keeps its own TSC), so the",
            "latency columns are not meaningful on this host; rates and counters still are"]


# The target vCPU's stats-fd counters recorded over each path's deliveries.
COUNTERS = ("exits", "signal_exits", "irq_injections", "irq_window_exits")


@dataclasses.dataclass
class PathMeasurement:
    """One path's deliveries: latencies (ns), wall time and the target vCPU's counters over them."""

    path: str
    latencies_ns: list[float]
    elapsed_s: float
    counters: dict[str, int]
    implementation: str = "python"

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
        """Several rounds of one path and implementation as one measurement."""
        return cls(runs[0].path, [lat for run in runs for lat in run.latencies_ns],
                   sum(run.elapsed_s for run in runs),
                   {name: sum(run.counters[name] for run in runs) for name in runs[0].counters},
                   runs[0].implementation)

    @property
    def negative_latencies(self) -> int:
        """Deliveries the guest stamped before the host's send: the two TSCs disagree."""
        return sum(latency < 0 for latency in self.latencies_ns)

    def row(self) -> str:
        """One line of the table whose header is :data:`TABLE_HEADER`."""
        return (f"{PATHS[self.path]:38} {self.implementation:6} {self.rate:7.0f} {self.p50_us:8.1f} "
                f"{self.p99_us:8.1f} {self.exits_per_interrupt:9.2f} "
                f"{self.per_interrupt('signal_exits'):9.2f} {self.per_interrupt('irq_injections'):9.2f}")

    @property
    def rate(self) -> float:
        """Interrupts delivered per second (one at a time, each waited for)."""
        return self.count / self.elapsed_s

    @property
    def p50_us(self) -> float:
        return statistics.median(self.latencies_ns) / 1000

    @property
    def p99_us(self) -> float:
        if len(self.latencies_ns) < 2:
            return self.latencies_ns[0] / 1000
        return statistics.quantiles(self.latencies_ns, n=100, method="inclusive")[98] / 1000


def _cpu_split() -> tuple[set[int], set[int]] | None:
    """(injector CPUs, target vCPU CPUs): the first and last CPU this process may use, or None.

    Pinning the two threads apart makes every path measure the same thing, a
    delivery to a vCPU running on another CPU. Left to the scheduler, the two
    threads sometimes share a CPU, and then a kernel path's "kick" finds the
    vCPU not running, which is a different (and on kvm_pvm much faster) case.
    """
    cpus = sorted(os.sched_getaffinity(0))
    return ({cpus[0]}, {cpus[-1]}) if len(cpus) >= 2 else None


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
    """A long-mode guest on a VM of the path's irqchip mode, spinning with IF=1 in its own thread."""

    def __init__(self, kvm, path: str) -> None:
        self.path = path
        self.split = _cpu_split()
        irqchip = "none" if path == "kick" else "kernel"
        self.vm = kvm.create_vm(irqchip=irqchip)
        try:
            sessions = guests.boot_cpus(self.vm, "long", cpus=2 if path == "ipi" else 1)
            self.sender: GuestSession | None = sessions[0] if path == "ipi" else None
            self.session: GuestSession = sessions[-1]
            self.vcpu = self.session.vcpu
            self.controller = UserspaceIrqController(self.vcpu) if path == "kick" else None
            if irqchip == "kernel":
                for session in sessions:
                    session.apic_enable()
            self.session.command(Command.STI)
            self.tsc_hz = self.vcpu.tsc_khz * 1000
            self.tsc_offset = self._guest_tsc_offset()
            # KVM_GET_STATS_FD is a vCPU ioctl: it would wait for the vCPU mutex, which a
            # vCPU spinning inside KVM_RUN with no exits never releases. Open it now.
            self.stats = self.vcpu.stats
            self.session.send(Command.SPIN, SPIN_FOREVER)
            self.thread = VcpuThread(self.vcpu, self._run)
        except BaseException:
            self.vm.close()
            raise

    def _guest_tsc_offset(self, samples: int = 5) -> int:
        """Guest TSC minus host TSC (0 on kvm_pvm), read while the vCPU is stopped.

        Each sample brackets a KVM_GET_MSRS with two host rdtsc; the tightest
        bracket wins (under emulation one ioctl can take longer than a delivery).
        """
        readings = []
        for _ in range(samples):
            before = lib.pykvm_rdtsc()
            guest = self.vcpu.get_msrs([IA32_TSC])[IA32_TSC]
            after = lib.pykvm_rdtsc()
            readings.append((after - before, guest - (before + after) // 2))
        return min(readings)[1]

    def _run(self, stopping: threading.Event) -> None:
        if self.split:
            os.sched_setaffinity(0, self.split[1])       # this thread only
        session = self.session
        while not stopping.is_set():
            stop = session.run()
            if stop.kind == StopKind.SYNC:            # the spin ended: spin again
                session.send(Command.SPIN, SPIN_FOREVER)
            elif stop.kind not in (StopKind.KICKED, StopKind.HLT, StopKind.VECTOR, StopKind.WINDOW):
                raise PyKvmError(f"path {self.path}: unexpected stop {stop.describe()}")

    @property
    def log_count(self) -> int:
        return self.session.log_count()

    def wait_for(self, count: int) -> None:
        deadline = time.monotonic() + DELIVERY_TIMEOUT
        while self.session.log_count() < count:
            # Sleep rather than spin: the kick path's vCPU thread needs the GIL to take its
            # EINTR exit and inject, and a spinning waiter would hold it for the whole 5 ms
            # switch interval.
            time.sleep(POLL_INTERVAL)
            if time.monotonic() > deadline:
                raise PyKvmError(f"path {self.path}: interrupt {count} not delivered within "
                                 f"{DELIVERY_TIMEOUT} s")

    @contextlib.contextmanager
    def deliveries(self):
        """The injecting block: the caller's thread pinned apart from the vCPU, and the
        vCPU's :data:`COUNTERS` counted over it (yields the stats delta)."""
        with _pinned_injector(self.split), self.stats.delta(*COUNTERS) as counters:
            yield counters

    def measurement(self, sent_tsc: list[int], first_record: int, elapsed: float, counters,
                    implementation: str = "python") -> PathMeasurement:
        return PathMeasurement(self.path, self.latencies(sent_tsc, first_record), elapsed,
                               {name: counters[name] for name in COUNTERS}, implementation)

    def latencies(self, sent_tsc: list[int], first_record: int) -> list[float]:
        records = self.session.records_since(first_record)
        if len(records) != len(sent_tsc):
            raise PyKvmError(f"{self.path}: {len(sent_tsc)} interrupts sent, {len(records)} logged by "
                             f"the guest; latencies would pair the wrong records")
        return [(record.tsc - self.tsc_offset - sent) * 1e9 / self.tsc_hz
                for record, sent in zip(records, sent_tsc, strict=True)]

    def close(self) -> None:
        try:
            self.thread.cancel()
        finally:
            self.vm.close()


def _injector(target: _Target) -> Callable[[], None]:
    """The Python call that makes one interrupt for ``target.path``."""
    vm = target.vm
    if target.path == "kick":
        controller = target.controller
        assert controller is not None        # the kick target has one

        def kick() -> None:
            controller.queue(VECTOR)
            target.vcpu.kick()
        return kick
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


def measure(kvm, path: str, count: int = 200) -> PathMeasurement:
    """Deliver ``count`` interrupts one at a time through ``path``; each is waited for in the log.

    The injecting thread is the caller's; the target vCPU runs in its own
    thread, so every path (irqfd included) comes from outside the vCPU thread.
    """
    target = _Target(kvm, path)
    try:
        inject = _injector(target)
        first = target.log_count
        sent: list[int] = []
        with target.deliveries() as counters:
            start = time.perf_counter()
            for i in range(count):
                sent.append(lib.pykvm_rdtsc())
                inject()
                target.wait_for(first + i + 1)
            elapsed = time.perf_counter() - start
        return target.measurement(sent, first, elapsed, counters)
    finally:
        target.close()


def measure_c_baseline(kvm, path: str, count: int = 200) -> PathMeasurement:
    """The ``msi`` / ``irqfd`` path driven by the C injector (``pykvm_bench_inject``), same guest setup."""
    if path not in ("msi", "irqfd"):
        raise ValueError("the C injector covers the msi and irqfd paths")
    target = _Target(kvm, path)
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
        sent = ffi.new("unsigned long long[]", count)
        first = target.log_count
        with target.deliveries() as counters:
            start = time.perf_counter()
            done = lib.pykvm_bench_inject(kind, fd, msi, log_count, count, sent,
                                          int(DELIVERY_TIMEOUT * target.tsc_hz),
                                          int(POLL_INTERVAL * 1e9))
            elapsed = time.perf_counter() - start
        if done != count:
            raise PyKvmError(f"C injector, path {path}: delivered {done} of {count} interrupts")
        return target.measurement(list(sent), first, elapsed, counters, "c")
    finally:
        target.close()
