"""One interrupt followed along KVM's path in KVM's own trace events: :func:`trace_interrupt`.

Why this exists: between the host's request and the guest's handler, an
interrupt goes through steps userspace never sees. With the in-kernel irqchip:
``KVM_SIGNAL_MSI`` (``kvm_msi_set_irq``); the LAPIC accepts the vector into its
IRR and raises ``KVM_REQ_EVENT`` (``kvm_apic_accept_irq``); before the next
entry ``vcpu_enter_guest()`` handles the request and injects the vector
(``kvm_inj_virq``: on VT-x the write of ``VM_ENTRY_INTR_INFO_FIELD``); the CPU
enters the guest (``kvm_entry``); the guest's handler runs; its ``out`` exits
(``kvm_exit``, ``kvm_pio``, ``kvm_userspace_exit``). This module records those
events around one MSI, in a tracefs instance of this process
(:mod:`pykvm.runtime.trace`), and places the guest's own log record among
them: its TSC, less the guest-minus-host TSC offset measured just before
(:func:`pykvm.hosts.delivery_latency.guest_tsc_offset`), on the trace's clock. The demo and
the doctor print it, and say which of the events this host does not emit.
"""

from __future__ import annotations

import dataclasses
import time

from . import guests
from .core.binding import lib
from .core.interrupts import MsiMessage
from .guests import Command, LogRecord
from .hosts import explain_exit
from .hosts.delivery_latency import TscOffset, guest_tsc_offset
from .runtime import trace

VECTOR = 0x61
# In the order an interrupt meets them (kvm_exit ... kvm_userspace_exit: the handler's report).
PATH_EVENTS = ("kvm:kvm_msi_set_irq", "kvm:kvm_apic_accept_irq", "kvm:kvm_inj_virq", "kvm:kvm_entry",
               "kvm:kvm_exit", "kvm:kvm_pio", "kvm:kvm_userspace_exit")
MEANING = {
    "kvm:kvm_msi_set_irq": "KVM_SIGNAL_MSI reaches KVM's MSI code",
    "kvm:kvm_apic_accept_irq": "the in-kernel LAPIC sets the vector in its IRR and raises KVM_REQ_EVENT",
    "kvm:kvm_inj_virq": "vcpu_enter_guest() handled KVM_REQ_EVENT: the vector is written for injection "
                        "(reinjected=1: an exit interrupted the delivery, KVM injects it again)",
    "kvm:kvm_entry": "VM entry",
    "kvm:kvm_exit": "VM exit",
    "kvm:kvm_pio": "port IO the guest did",
    "kvm:kvm_userspace_exit": "KVM_RUN returns to userspace",
}
# The fields worth printing per event (the rest are in the recording).
SHOWN_FIELDS = {
    "kvm:kvm_msi_set_irq": ("address", "data"), "kvm:kvm_apic_accept_irq": ("apicid", "vec", "tm"),
    "kvm:kvm_inj_virq": ("vector", "irq", "soft", "reinjected"), "kvm:kvm_entry": ("vcpu_id", "rip"),
    "kvm:kvm_exit": ("exit_reason", "guest_rip"), "kvm:kvm_pio": ("rw", "port", "val"),
    "kvm:kvm_userspace_exit": ("reason", "errno"),
}


@dataclasses.dataclass(frozen=True)
class PathStep:
    """One line of the timeline: ``at`` seconds after the host action (trace clock)."""

    at: float
    source: str                 # "host", "trace" or "guest"
    name: str
    text: str


@dataclasses.dataclass
class InterruptPath:
    """What one traced interrupt (or, with ``control``, no interrupt) left behind."""

    vector: int
    control: bool
    recording: trace.Recording
    records: list[LogRecord]
    tsc_offset: TscOffset
    steps: list[PathStep]

    @property
    def fired(self) -> set[str]:
        return self.recording.fired

    @property
    def not_emitted(self) -> tuple[str, ...]:
        """Path events this kernel has but did not emit for this interrupt (plus those it lacks)."""
        return self.recording.silent + self.recording.missing

    def first(self, name: str, **fields: int) -> trace.TraceEvent | None:
        """The first ``name`` event whose fields match ``fields``."""
        for event in self.recording.named(name):
            if all(event.fields.get(key) == value for key, value in fields.items()):
                return event
        return None

    @property
    def injection(self) -> trace.TraceEvent | None:
        """The first kvm_inj_virq of our vector (its field is ``vector`` since Linux 6.3, ``irq`` before)."""
        return self.first("kvm:kvm_inj_virq", vector=self.vector) or self.first("kvm:kvm_inj_virq", irq=self.vector)

    @property
    def accepted(self) -> trace.TraceEvent | None:
        return self.first("kvm:kvm_apic_accept_irq", vec=self.vector)

    @property
    def entry_after_injection(self) -> trace.TraceEvent | None:
        injection = self.injection
        if injection is None:
            return None
        return next((e for e in self.recording.named("kvm:kvm_entry") if e.time >= injection.time), None)

    def report(self) -> list[str]:
        lines = [f"{step.at * 1e6:9.1f} us  {step.source:5}  {step.name}: {step.text}" for step in self.steps]
        lines.append(f"(times after the host action, on the trace clock; the guest's record placed with "
                     f"{self.tsc_offset.describe()})")
        if self.not_emitted and not self.control:
            lines.append("not emitted on this host: " + ", ".join(self.not_emitted))
        return lines


def _event_text(event: trace.TraceEvent) -> str:
    shown = [f"{key}={int(event.fields[key]):#x}" if isinstance(event.fields[key], int)
             else f"{key}={event.fields[key]}" for key in SHOWN_FIELDS.get(event.name, ()) if key in event.fields]
    return f"{MEANING.get(event.name, '')} ({', '.join(shown)})"


def trace_interrupt(vector: int = VECTOR, control: bool = False) -> InterruptPath:
    """Send one MSI (``control``: none) to a long-mode guest with IF=1, then run it, tracing the path.

    Raises :class:`pykvm.runtime.trace.TracingUnavailable` when tracefs cannot be used.
    """
    with guests.boot(irqchip="kernel", explain=explain_exit) as guest:
        guest.apic_enable()
        guest.command(Command.STI)
        offset = guest_tsc_offset(guest)
        logged = guest.log_count()
        message, vm = MsiMessage.compose(destination=0, vector=vector), guest.vcpu.vm
        with trace.record(*PATH_EVENTS) as recording:
            host_tsc, start = lib.pykvm_rdtsc(), time.monotonic()
            if not control:
                vm.signal_msi(message)
            action = time.monotonic()
            guest.command(Command.NOP)            # KVM_RUN: the entry injects, the handler logs
        records = guest.records_since(logged)
    steps = [PathStep(0.0, "host", "vm.signal_msi()" if not control else "nothing (control)",
                      f"called: KVM_SIGNAL_MSI for vector {vector:#x} to APIC 0 (after pykvm's checks)"
                      if not control else "no interrupt sent"),
             PathStep(action - start, "host", "KVM_RUN", "the ioctl above returned; the guest runs one command (NOP)")]
    steps += [PathStep(event.time - start, "trace", event.name.split(":")[1], _event_text(event))
              for event in recording.events]
    for record in records:
        host_cycles = record.tsc - offset.cycles - host_tsc
        steps.append(PathStep(host_cycles / offset.tsc_hz, "guest", "handler",
                              f"logged vector {record.vector:#x} at RIP {record.rip:#x} "
                              f"(its first instruction's rdtsc)"))
    steps.sort(key=lambda step: step.at)
    return InterruptPath(vector, control, recording, records, offset, steps)


__all__ = ["InterruptPath", "PATH_EVENTS", "PathStep", "VECTOR", "trace_interrupt"]
