"""EVENT, NMI and TRIPLE_FAULT: the requests behind injecting events from the host."""

from __future__ import annotations

from collections.abc import Callable

import pykvm
from pykvm import x86
from pykvm.core.constants import VcpuEventValid
from pykvm.core.exits import ShutdownExit
from pykvm.injection import Injector

from .common import (
    OBSERVED,
    PORT_HANDLER,
    PORT_READY,
    ScenarioRecorder,
    ScenarioResult,
    io_port,
    is_port,
    machine,
    request,
    run_until,
)

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


def event(control: bool = False) -> ScenarioResult:
    """KVM_INTERRUPT queues a vector and raises KVM_REQ_EVENT: the next entry injects it."""
    t = ScenarioRecorder("EVENT", control)
    with machine() as (vm, vcpu):
        x86.load_code(vcpu, EVENT_GUEST, handlers={0x40: "handler"})
        run_until(vcpu, t, is_port(PORT_READY))
        with vcpu.stats.delta("req_event", "irq_injections") as d:
            if not control:
                t.host("KVM_INTERRUPT vector 0x40 (KVM raises KVM_REQ_EVENT)")
                Injector(vcpu).interrupt(0x40)     # the `out` exit reported ready
            else:
                t.host("nothing (control)")
            exit = t.exit(vcpu.run())
        stats = t.stats("vCPU", d, ("req_event", "irq_injections"))
        handled = io_port(exit) == PORT_HANDLER
        t.guest("handler of vector 0x40 ran" if handled else "the guest went on looping; no handler ran")
        t.outcome.evidence.update(stats, handler_ran=handled)
        return t.verdict(
            handled and stats["irq_injections"] >= 1 and stats["req_event"] >= 1,
            "req_event and irq_injections counted, the guest's 0x40 handler ran",
        )


# ---- NMI -------------------------------------------------------------------------

NMI_GUEST = """
loop:   out %al, $0x10
        jmp loop
nmi:    mov $2, %eax
        out %al, $0x11           # the NMI handler ran
        iretq
"""


def nmi(control: bool = False) -> ScenarioResult:
    """KVM_NMI raises KVM_REQ_NMI: the next entry moves it to nmi.pending and injects vector 2."""
    t = ScenarioRecorder("NMI", control)
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
        return t.verdict(
            handled and stats["nmi_injections"] >= 1, "nmi_injections counted, the guest's vector-2 handler ran"
        )


# ---- TRIPLE_FAULT ----------------------------------------------------------------

TRIPLE_GUEST = """
loop:   out %al, $0x10
        jmp loop
"""


def triple_fault(control: bool = False) -> ScenarioResult:
    """A pending triple fault set with KVM_SET_VCPU_EVENTS raises KVM_REQ_TRIPLE_FAULT: shutdown, no entry."""
    t = ScenarioRecorder("TRIPLE_FAULT", control)
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
            events.flags = VcpuEventValid.TRIPLE_FAULT
            t.host(
                "KVM_CAP_X86_TRIPLE_FAULT_EVENT on; KVM_SET_VCPU_EVENTS triple_fault.pending=1 "
                "(KVM raises KVM_REQ_TRIPLE_FAULT)"
            )
            vcpu.events = events
        else:
            t.host("nothing (control)")
        exit = t.exit(vcpu.run())
        shutdown = isinstance(exit, ShutdownExit)
        moved = vcpu.regs.rip != rip
        t.guest(
            f"RIP {'moved' if moved else 'unchanged'}: "
            f"{'the guest ran' if moved else 'KVM stopped before entering the guest'}"
        )
        t.outcome.evidence.update(shutdown=shutdown, guest_ran=moved)
        return t.verdict(shutdown, "KVM_EXIT_SHUTDOWN without the guest running an instruction")


REQUESTS = (
    request(
        "EVENT",
        "KVM_INTERRUPT, KVM_SET_REGS, KVM_SET_VCPU_EVENTS, LAPIC delivery",
        "inject_pending_event()",
        "KVM_INTERRUPT 0x40 to a guest with IF=1",
        "stats req_event, irq_injections; the guest's handler",
        "KVM_REQ_EVENT means 'something may be deliverable now': at the next entry KVM re-evaluates pending "
        "exceptions, NMIs, SMIs and interrupts and injects the highest-priority one the guest accepts (or "
        "opens an interrupt/NMI window). Without it, a vector queued while the vCPU was outside the guest "
        "would wait for an unrelated exit.",
        OBSERVED,
        OBSERVED,
        intel=OBSERVED,
    ),
    request(
        "NMI",
        "KVM_NMI, LAPIC NMI delivery",
        "process_nmi()",
        "KVM_NMI",
        "stat nmi_injections; the guest's vector-2 handler",
        "KVM_REQ_NMI moves NMIs raised from any context into the vCPU's nmi_pending count (at most two: one "
        "in service, one latched), then KVM_REQ_EVENT injects one. Collecting them at entry keeps the count "
        "race-free against the vCPU thread.",
        OBSERVED,
        OBSERVED,
        intel=OBSERVED,
    ),
    request(
        "TRIPLE_FAULT",
        "KVM_SET_VCPU_EVENTS (triple_fault.pending), nested exits, KVM_X86_SET_MCE",
        "vcpu_enter_guest(): KVM_EXIT_SHUTDOWN",
        "KVM_CAP_X86_TRIPLE_FAULT_EVENT + a pending triple fault",
        "KVM_EXIT_SHUTDOWN with no guest instruction run",
        "KVM_REQ_TRIPLE_FAULT makes the next entry end the run with KVM_EXIT_SHUTDOWN (or a nested VM exit to "
        "L1) instead of entering: a shutdown decided outside the guest, e.g. restored by migration, takes "
        "effect without guest code running.",
        OBSERVED,
        OBSERVED,
        intel=OBSERVED,
    ),
)
SCENARIOS: dict[str, Callable[..., ScenarioResult]] = {"EVENT": event, "NMI": nmi, "TRIPLE_FAULT": triple_fault}
