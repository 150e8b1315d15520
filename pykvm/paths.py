"""The same vector through five delivery paths, timed and counted.

Why this exists: the study note behind pykvm contrasts kicking a vCPU out of
the guest to inject from userspace with delivery the kernel does while the
vCPU runs. This module makes that concrete for the demo and the benchmark:
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

import dataclasses
import statistics
import threading
import time
from typing import Callable

from . import apic, guests
from .binding import ffi, lib
from .errors import PyKvmError
from .guests import GuestSession, StopKind
from .irq import UserspaceIrqController
from .irqchip import MsiRoute
from .layout import Command
from .smp import VcpuThread

VECTOR = 0x61
SPIN_FOREVER = 2**32 - 1
IOAPIC_PIN = 19            # >= 16: an IOAPIC-only GSI (0-15 also reach the 8259s)
IRQFD_GSI = 100
DELIVERY_TIMEOUT = 1.0          # seconds one interrupt may take before the path is declared broken
IA32_TSC = 0x10

PATHS: dict[str, str] = {
    "kick": "userspace: kick + KVM_INTERRUPT",
    "irq_line": "KVM_IRQ_LINE via IOAPIC",
    "msi": "KVM_SIGNAL_MSI",
    "irqfd": "irqfd (eventfd write, another thread)",
    "ipi": "IPI from another vCPU",
}


@dataclasses.dataclass
class PathMeasurement:
    """One path's deliveries: latencies (ns), wall time and the target vCPU's exits."""

    path: str
    latencies_ns: list[float]
    elapsed_s: float
    exits: int
    implementation: str = "python"

    @property
    def count(self) -> int:
        return len(self.latencies_ns)

    @property
    def exits_per_interrupt(self) -> float:
        return self.exits / self.count

    @property
    def rate(self) -> float:
        """Interrupts delivered per second (one at a time, each waited for)."""
        return self.count / self.elapsed_s

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_ns)
        return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]

    @property
    def p50_us(self) -> float:
        return statistics.median(self.latencies_ns) / 1000

    @property
    def p99_us(self) -> float:
        return self.percentile(99) / 1000


class _Target:
    """A long-mode guest on a VM of the path's irqchip mode, spinning with IF=1 in its own thread."""

    def __init__(self, kvm, path: str) -> None:
        self.path = path
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
            self.session.send(Command.SPIN, SPIN_FOREVER)
            self.thread = VcpuThread(self.vcpu, self._run)
        except BaseException:
            self.vm.close()
            raise

    def _guest_tsc_offset(self) -> int:
        """Guest TSC minus host TSC (0 on kvm_pvm), read while the vCPU is stopped."""
        before = lib.pykvm_rdtsc()
        guest = self.vcpu.get_msrs([IA32_TSC])[IA32_TSC]
        after = lib.pykvm_rdtsc()
        return guest - (before + after) // 2

    def _run(self, stopping: threading.Event) -> None:
        session = self.session
        while not stopping.is_set():
            stop = session.run()
            if stop.kind == StopKind.SYNC:            # the spin ended: spin again
                session.send(Command.SPIN, SPIN_FOREVER)
            elif stop.kind not in (StopKind.KICKED, StopKind.HLT, StopKind.VECTOR):
                raise PyKvmError(f"path {self.path}: unexpected stop {stop.describe()}")

    @property
    def log_count(self) -> int:
        return self.session.log_count()

    def wait_for(self, count: int) -> None:
        deadline = time.monotonic() + DELIVERY_TIMEOUT
        while self.session.log_count() < count:
            if time.monotonic() > deadline:
                raise PyKvmError(f"path {self.path}: interrupt {count} not delivered within "
                                 f"{DELIVERY_TIMEOUT} s")

    def latencies(self, sent_tsc: list[int], first_record: int) -> list[float]:
        records = self.session.records_since(first_record)
        return [(record.tsc - self.tsc_offset - sent) * 1e9 / self.tsc_hz
                for record, sent in zip(records, sent_tsc)]

    def close(self) -> None:
        try:
            self.thread.cancel()
        finally:
            self.vm.close()


def _injector(target: _Target) -> Callable[[], None]:
    """The Python call that makes one interrupt for ``target.path``."""
    vm = target.vm
    if target.path == "kick":
        def kick() -> None:
            target.controller.queue(VECTOR)
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
        message = apic.compose_msi(destination=target.vcpu.id, vector=VECTOR)
        return lambda: vm.signal_msi(message)
    if target.path == "irqfd":
        vm.set_gsi_routing(vm.routes + (MsiRoute(IRQFD_GSI, apic.compose_msi(
            destination=target.vcpu.id, vector=VECTOR)),))
        return vm.irqfd(IRQFD_GSI).trigger
    if target.path == "ipi":
        icr = apic.icr(VECTOR, destination=target.vcpu.id)
        return lambda: target.sender.apic_write(apic.ApicReg.ICR_LOW, icr)
    raise ValueError(f"unknown delivery path {target.path!r}; choose one of {', '.join(PATHS)}")


def _route_ioapic_pin(target: _Target, pin: int) -> None:
    """Program the IOAPIC pin from the host side (KVM_SET_IRQCHIP): edge, fixed, to the target."""
    from .constants import IrqchipId
    state = target.vm.irqchip_state.ioapic
    entry = apic.RedirectionEntry(vector=VECTOR, destination=target.vcpu.id)
    target.vm.set_irqchip(IrqchipId.IOAPIC, state.with_entry(pin, entry))


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
        before = target.vcpu.stats.read()
        start = time.perf_counter()
        for i in range(count):
            sent.append(lib.pykvm_rdtsc())
            inject()
            target.wait_for(first + i + 1)
        elapsed = time.perf_counter() - start
        exits = target.vcpu.stats.read()["exits"] - before["exits"]
        return PathMeasurement(path, target.latencies(sent, first), elapsed, exits)
    finally:
        target.close()


def measure_c_baseline(kvm, path: str, count: int = 200) -> PathMeasurement:
    """The ``msi`` / ``irqfd`` path driven by the C injector (``pykvm_bench_inject``), same guest setup."""
    if path not in ("msi", "irqfd"):
        raise ValueError("the C injector covers the msi and irqfd paths")
    target = _Target(kvm, path)
    try:
        message = apic.compose_msi(destination=target.vcpu.id, vector=VECTOR)
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
        before = target.vcpu.stats.read()
        start = time.perf_counter()
        done = lib.pykvm_bench_inject(kind, fd, msi, log_count, count, sent,
                                      int(DELIVERY_TIMEOUT * target.tsc_hz))
        elapsed = time.perf_counter() - start
        if done != count:
            raise PyKvmError(f"C injector, path {path}: delivered {done} of {count} interrupts")
        exits = target.vcpu.stats.read()["exits"] - before["exits"]
        return PathMeasurement(path, target.latencies(list(sent), first), elapsed, exits, "c")
    finally:
        target.close()
