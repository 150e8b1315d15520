"""``python -m pykvm.demo``: interrupts injected through /dev/kvm, seen by a real guest.

Why this exists: it is the first thing a person runs on a KVM host. It boots a
pykvm guest image, injects vectors and an NMI, plays the interrupt-window
scenario (guest CLI, host queues a vector, guest STI), and prints a timeline
that pairs every host action and KVM exit with what the guest's own handler
logged. It follows one MSI along KVM's path in KVM's own trace events
(:mod:`pykvm.interrupt_path`; it names the events this host does not emit).
Then it delivers one vector through each delivery path (userspace
kick + KVM_INTERRUPT, KVM_IRQ_LINE, KVM_SIGNAL_MSI, irqfd, IPI) to a vCPU
that spins on another CPU, halts, or shares the injector's CPU, and prints per
path and state the latency and the exits per interrupt from the stats fd, what
those numbers say (derived from them, not written in advance), and finally
names the host's vendor module and what it did differently. ``--plot FILE.svg``
also draws those latencies' distributions, one per path in a panel per target
state (:mod:`pykvm.hosts.latency_plot`; matplotlib, pykvm's ``plot`` extra).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

from . import guests, hosts, interrupt_path, x86
from .command import description, invoked_as
from .core.constants import ExitReason
from .core.errors import GuestError, HostLimitation, InvalidArgument
from .core.exits import FailEntryExit
from .core.system import Kvm
from .exit_status import exit_with, run_command
from .guests import Command, GuestSession, LogRecord, StopKind
from .hosts import delivery_latency, latency_plot
from .injection import Injector
from .irqchip import UserspaceIrqController
from .runtime import trace
from .x86 import Mode

DEMO_VECTORS = (0x20, 0x41, 0x80, 0xEC)
WINDOW_VECTOR = 0x51
SPIN_ITERATIONS = 20_000
MAX_WINDOW_EXITS = 1_000


class TimelinePrinter:
    """Host actions, KVM exits and guest records, in order, with times since boot."""

    def __init__(self, session: GuestSession, start: float) -> None:
        self.session = session
        self.start = start
        self.seen_stops = 0
        self.seen_records = 0

    def _stamp(self, when: float | None = None) -> str:
        return f"{((when or time.perf_counter()) - self.start) * 1e3:8.3f} ms"

    def host(self, text: str) -> None:
        self.flush()
        print(f"  {self._stamp()}  host   {text}")

    def note(self, text: str) -> None:
        print(f"  {'':11}  note   {text}")

    def flush(self) -> list[LogRecord]:
        """Print the exits and guest records that arrived since the last flush."""
        stops = self.session.stops[self.seen_stops:]
        self.seen_stops += len(stops)
        records = self.session.records_since(self.seen_records)
        self.seen_records += len(records)
        pending = list(records)
        for stop in stops:
            print(f"  {self._stamp(stop.time)}  exit   {stop.describe()}")
            if stop.kind == StopKind.VECTOR and pending and pending[0].vector == stop.value:
                self._record(pending.pop(0))
        for record in pending:
            self._record(record)
        return records

    def _record(self, record: LogRecord) -> None:
        flags = f"IF was {int(record.interrupts_were_enabled)}"
        print(f"  {'':11}  guest  handler logged #{record.seq}: {record.name}, interrupted "
              f"{record.cs:#x}:{record.rip:#x} ({flags})")


def _section(title: str) -> None:
    print(f"\n== {title}")


def run_demo(mode: str, path_count: int, plot: Path | None = None) -> int:
    """Run the demo; with ``plot``, draw section 5's latencies into that SVG (checked before anything runs)."""
    if plot is not None:
        if path_count <= 0:
            raise InvalidArgument(f"--plot {plot}: the plot draws section 5's path comparison, which "
                                  f"--path-count {path_count} skips; give --path-count N > 0")
        latency_plot.check_target(plot, "--plot")
    with Kvm() as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu()
        host = hosts.detect()
        image = guests.load(mode)
        print(f"pykvm demo: {mode}-mode guest on /dev/kvm (vendor module {host.name}, "
              f"KVM API {kvm.api_version})")
        print("Each handler in the guest's IDT/IVT logs the vector and the interrupted RIP; with "
              "notify on it also reports with `out`, so each delivery shows up as an exit.")
        start = time.perf_counter()
        session = image.boot(vcpu, notify=True, explain=hosts.explain_exit)
        timeline = TimelinePrinter(session, start)
        _section("0. boot: the guest installs its handlers and reports step 0")
        timeline.flush()
        controller = UserspaceIrqController(vcpu)
        observed = []
        try:
            _inject_sequence(session, timeline)
            _inject_nmi(session, timeline)
            observed.append(_window_scenario(session, timeline, controller))
            session.command(Command.DONE)
            timeline.flush()
        except HostLimitation as limit:
            timeline.flush()
            _section("host limit reached")
            print(f"  {limit}")
            observed.append("stopped at a documented host limit (above); the deliveries before it "
                            "were checked in the guest's log")
        except GuestError as error:
            if not isinstance(error.exit, FailEntryExit):
                raise
            # kvm_intel: the VM entry itself failed (e.g. an external interrupt injected while
            # IF=0); pykvm.hosts.limits explains the hardware reason in the exit.
            timeline.flush()
            _section("the VM entry failed")
            print(f"  {error.exit.explanation or error}")
            observed.append("stopped at a failed VM entry (above); the deliveries before it were "
                            "checked in the guest's log")
        observed.append(_traced_path())
        if path_count:
            _compare_paths(kvm, path_count, plot, host.name)
        _summary(session, host, observed)
    return 0


def _traced_path() -> str:
    _section(f"4. one MSI along KVM's path, in KVM's own trace events (in-kernel irqchip, vector "
             f"{interrupt_path.VECTOR:#x})")
    try:
        path = interrupt_path.trace_interrupt()
    except trace.TracingUnavailable as exc:
        print(f"  {exc}")
        return f"trace timeline: not recorded ({exc})"
    for line in path.report():
        print(f"  {line}")
    if path.injection is not None:
        return ("trace timeline: the LAPIC accepted the vector, vcpu_enter_guest() injected it "
                "(kvm_inj_virq), the next kvm_entry entered the guest, its handler logged it")
    return (f"trace timeline: {len(path.recording.events)} events; this host does not emit "
            f"{', '.join(path.not_emitted) or 'none of them missing'}")


def _compare_paths(kvm: Kvm, count: int, plot: Path | None, host_name: str) -> None:
    _section(f"5. the same vector ({delivery_latency.VECTOR:#x}) through each delivery path to a vCPU in three "
             f"states, {count} times each")
    print("  Measured by pykvm.hosts.delivery_latency.compare(), as `pykvm bench injection` does with more "
          "interrupts.\n  kick: the vCPU leaves the guest to userspace and re-enters with the vector "
          "(KVM_INTERRUPT). The kernel\n  paths set the vector in the in-kernel LAPIC and, if the vCPU "
          "is in the guest, kick it inside the kernel.")
    comparison = delivery_latency.compare(kvm, count)
    for line in comparison.report():
        print(f"  {line}")
    if plot is not None:
        title = (f"pykvm demo on {host_name} (Linux {platform.release()}): {count} paced interrupts per "
                 f"path and target state")
        series = latency_plot.draw(comparison, plot, title, "--plot")
        print(f"  drawn into {plot}: {len(series)} latency distributions, one per path in each target state")


def _inject_sequence(session: GuestSession, timeline: TimelinePrinter) -> None:
    _section(f"1. inject {len(DEMO_VECTORS)} vectors with KVM_INTERRUPT (guest IF=1)")
    session.command(Command.STI)
    injector = Injector(session.vcpu)
    for vector in DEMO_VECTORS:
        ready = session.vcpu.kvm_run.ready_for_interrupt_injection
        timeline.host(f"KVM_INTERRUPT {vector:#x} (last exit reported ready={ready})")
        injector.interrupt(vector)
        session.command(Command.NOP)
        records = timeline.flush()
        assert [r.vector for r in records] == [vector], "the guest did not log the vector"


def _inject_nmi(session: GuestSession, timeline: TimelinePrinter) -> None:
    _section("2. inject an NMI with KVM_NMI")
    timeline.host("KVM_NMI")
    session.vcpu.nmi()
    session.command(Command.NOP)
    records = timeline.flush()
    assert [r.vector for r in records] == [2], "the guest did not log the NMI"


def _window_scenario(session: GuestSession, timeline: TimelinePrinter,
                     controller: UserspaceIrqController) -> str:
    _section("3. the interrupt window: guest CLI, host queues a vector, guest spins, then STI")
    stop = session.command(Command.CLI)
    timeline.flush()
    timeline.host(f"queue {WINDOW_VECTOR:#x} in pykvm's userspace irq controller "
                  f"(last exit: IF={stop.if_flag}, ready={stop.ready_for_interrupt_injection} -> "
                  f"not injectable; sets request_interrupt_window=1)")
    controller.queue(WINDOW_VECTOR)
    timeline.host(f"command SPIN {SPIN_ITERATIONS} (guest loops with IF=0, no exits)")
    session.command(Command.SPIN, SPIN_ITERATIONS)
    timeline.flush()
    timeline.host("command STI_NOP (guest: sti; nop; then its sync `out`)")
    session.command(Command.STI_NOP)
    records = timeline.flush()
    while controller.pending and len(session.stops) < MAX_WINDOW_EXITS:
        timeline.host(f"{WINDOW_VECTOR:#x} still pending; command NOP (the controller injects "
                      f"at the next entry, since the last exit reported ready=1)")
        session.command(Command.NOP)
        records += timeline.flush()
    injection = controller.injections[-1]
    after = (injection.after_exit.name if isinstance(injection.after_exit, ExitReason)
             else f"exit reason {injection.after_exit}")
    (record,) = [r for r in records if r.vector == WINDOW_VECTOR]
    end = session.address("sti_nop_end")
    print(f"  -> injected after the {after} exit at RIP {injection.rip:#x}; "
          f"the guest took it at RIP {record.rip:#x}")
    if injection.after_exit == ExitReason.IRQ_WINDOW_OPEN:
        where = ("right after the nop in the STI shadow" if record.rip == end
                 else f"at {record.rip:#x}")
        return f"interrupt window: KVM_EXIT_IRQ_WINDOW_OPEN arrived, vector delivered {where}"
    return (f"interrupt window: no KVM_EXIT_IRQ_WINDOW_OPEN came; the vector was injected at the "
            f"next exit reporting ready ({after}) and taken at "
            f"RIP {record.rip:#x}, past the guest's sync `out`")


def _summary(session: GuestSession, host, observed: list[str]) -> None:
    _section("summary")
    log = session.log()
    print(f"  the guest logged {len(log)} vectors: "
          f"{', '.join(x86.vector_name(r.vector) for r in log)}")
    print(f"  {len(session.stops)} exits to userspace; vendor module: {host.name}")
    for line in observed:
        print(f"  observed: {line}")
    differences = host.differences()
    if differences:
        reference = "the architecture" if host.vendor == hosts.VendorModule.INTEL else "VT-x / the architecture"
        print(f"  how {host.name} differs from {reference}:")
        for text in differences:
            print(f"    - {text}")
    else:
        known = host.sends_irq_window_exits
        print(f"  {host.name}: no known departures from the architecture in the facts above "
              f"({known.reason if known.verified else 'expected, not measured on this vendor module'})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=invoked_as("pykvm.demo"), description=description(__doc__))
    parser.add_argument("--mode", choices=[m.value for m in Mode], default="long",
                        help="CPU mode of the guest image (default: long)")
    parser.add_argument("--path-count", type=int, default=50, metavar="N",
                        help="interrupts per path in the path comparison (0 skips it; default 50)")
    parser.add_argument("--plot", type=Path, metavar="FILE.svg",
                        help="also draw the path comparison's latency distributions (one per path, a panel "
                             f"per target state) into this SVG; needs pykvm's '{latency_plot.EXTRA}' extra "
                             f"(matplotlib): pip install 'pykvm[{latency_plot.EXTRA}]'")
    args = parser.parse_args(argv)
    return run_command("pykvm demo", lambda: run_demo(args.mode, args.path_count, args.plot))


if __name__ == "__main__":
    exit_with(main())
