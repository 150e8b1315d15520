"""APF_HALT and APF_READY: asynchronous page faults, raised by a guest page that userfaultfd provides late.

Why this exists: when a guest touches a page the host has not got yet, KVM
need not stall the vCPU: with async page faults (the guest's opt-in through
MSR_KVM_ASYNC_PF_EN) it hands the fault to a kernel worker, tells the guest
"page not present" (a #PF whose CR2 is a token) and later "page ready" (an
interrupt carrying the same token). The scenarios here back a memory slot
with :meth:`pykvm.core.memory.GuestMemory.provide_pages`, whose provider
returns the touched page 300 ms late, and give KVM a guest that speaks the
protocol: one that waits in ``hlt`` for "page ready" (APF_READY) and one that
retries the access at once (the repeated fault is what raises APF_HALT).
The control runs place the page before the guest touches it.
"""

from __future__ import annotations

import functools
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from pykvm import x86
from pykvm.core.errors import RunTimeout
from pykvm.core.exits import IoExit
from pykvm.core.userfault import PageFault

from .common import (
    DATA,
    EXTRA_SLOT_GPA,
    OBSERVED,
    PORT_LOOP,
    PORT_READY,
    UNREACHABLE,
    ScenarioRecorder,
    ScenarioResult,
    is_port,
    machine,
    request,
    run_until,
)

MSR_KVM_ASYNC_PF_EN = 0x4B564D02
MSR_KVM_ASYNC_PF_INT = 0x4B564D06
MSR_KVM_ASYNC_PF_ACK = 0x4B564D07
# MSR_KVM_ASYNC_PF_EN bits: enabled, also at CPL 0, "page ready" as an interrupt (the only delivery since 5.10).
ASYNC_PF_ENABLED, ASYNC_PF_SEND_ALWAYS, ASYNC_PF_DELIVERY_AS_INT = 1, 2, 8
PAGE_READY_VECTOR = 0xEC
REASON_PAGE_NOT_PRESENT = 1           # 'flags' of struct kvm_vcpu_pv_apf_data
RECORD = DATA + 0x100                 # what the guest saw, below
# not-present #PFs, their token; ready interrupts, the last one's token; other #PFs; the value; 'wake all' tokens
RECORD_LAYOUT = struct.Struct("<QQQQQQQ")
RECORD_FIELDS = ("not_present", "not_present_token", "ready", "ready_token", "ordinary_pf", "value", "wake_all")
WAKE_ALL_TOKEN = 0xFFFFFFFF           # the token of the completion KVM queues when async PF is enabled
PROVIDED_PAGE = EXTRA_SLOT_GPA + 0x1000
PORT_VALUE = 0x13
VALUE = 0x5AF0_0D5A_5AF0_0D5A
DELAY = 0.3                           # seconds the provider takes to return the page
LAPIC_SVR, LAPIC_EOI = 0xFEE000F0, 0xFEE000B0


def apf_guest(wait_for_ready: bool, enable: bool = True) -> str:
    """Enable async PF, touch the provided page with IF=1, report its value; handlers for #PF and page ready.

    On a "page not present" #PF the handler either waits in ``hlt`` for the
    "page ready" interrupt of its token (``wait_for_ready``) or returns at
    once, so the access faults again on the same page while it is still on its
    way. ``enable=False`` writes MSR_KVM_ASYNC_PF_EN without the enable bit.
    """
    wait = f"""
wait:   sti
        hlt                             # until the page-ready interrupt of this token
        cli
        mov {RECORD + 24:#x}, %rax
        cmp {RECORD + 8:#x}, %rax
        jne wait
""" if wait_for_ready else ""
    flags = (ASYNC_PF_ENABLED if enable else 0) | ASYNC_PF_SEND_ALWAYS | ASYNC_PF_DELIVERY_AS_INT
    return f"""
        mov ${LAPIC_SVR:#x}, %rdi
        movl $0x1ff, (%rdi)             # LAPIC software-enabled: KVM only delivers page ready to an enabled LAPIC
        mov ${MSR_KVM_ASYNC_PF_INT:#x}, %ecx
        mov ${PAGE_READY_VECTOR:#x}, %eax
        xor %edx, %edx
        wrmsr                           # the page-ready vector first, then enable
        mov ${MSR_KVM_ASYNC_PF_EN:#x}, %ecx
        mov ${DATA | flags:#x}, %eax
        wrmsr
        out %al, ${PORT_READY:#x}
        sti
        out %al, ${PORT_LOOP:#x}        # one entry with IF=1: a pending page-ready interrupt is taken
        mov ${PROVIDED_PAGE:#x}, %rbx
        mov (%rbx), %rax                # the provided page: missing unless placed already
        mov %rax, {RECORD + 40:#x}
        out %eax, ${PORT_VALUE:#x}
loop:   out %al, ${PORT_READY:#x}
        jmp loop

pf_handler:
        push %rax
        mov {DATA:#x}, %eax             # apf 'flags': 1 means "page not present", the token is in CR2
        test ${REASON_PAGE_NOT_PRESENT}, %eax
        jz ordinary
        movl $0, {DATA:#x}
        incq {RECORD:#x}
        mov %cr2, %rax
        mov %rax, {RECORD + 8:#x}
{wait}
        pop %rax
        add $8, %rsp                    # the error code
        iretq
ordinary:
        incq {RECORD + 32:#x}
        mov %cr2, %rax
        hlt                             # an ordinary #PF is a failure: stop here

ready_handler:
        push %rax
        push %rcx
        push %rdx
        incq {RECORD + 16:#x}
        mov {DATA + 4:#x}, %eax         # apf 'token' of the ready page
        mov %rax, {RECORD + 24:#x}
        cmp ${WAKE_ALL_TOKEN:#x}, %eax
        jne 1f
        incq {RECORD + 48:#x}
1:      movl $0, {DATA + 4:#x}          # slot free for the next event
        mov ${MSR_KVM_ASYNC_PF_ACK:#x}, %ecx
        mov $1, %eax
        xor %edx, %edx
        wrmsr
        mov ${LAPIC_EOI:#x}, %rcx
        movl $0, (%rcx)
        pop %rdx
        pop %rcx
        pop %rax
        iretq
"""


EVENTS = ("kvm:kvm_try_async_get_page", "kvm:kvm_async_pf_not_present", "kvm:kvm_async_pf_repeated_fault",
          "kvm:kvm_async_pf_ready", "kvm:kvm_inj_exception")


def _async_pf(name: str, control: bool, wait_for_ready: bool, enable: bool = True) -> tuple[ScenarioRecorder, dict]:
    """Run the guest against a page provided 300 ms late (or placed first, ``control``): timeline and evidence."""
    t = ScenarioRecorder(name, control)
    evidence: dict = {}
    with machine(irqchip="kernel") as (vm, vcpu):
        slot = vm.memory.add_slot(EXTRA_SLOT_GPA, 0x10000)
        page = VALUE.to_bytes(8, "little")

        def provide(gpa: int) -> bytes:
            time.sleep(DELAY)
            return page

        with vm.memory.provide_pages(slot.slot, provide) as provider:
            x86.load_code(vcpu, apf_guest(wait_for_ready, enable),
                          handlers={14: "pf_handler", PAGE_READY_VECTOR: "ready_handler"})
            run_until(vcpu, t, is_port(PORT_READY))
            t.guest(f"MSR_KVM_ASYNC_PF_INT = {PAGE_READY_VECTOR:#x}, MSR_KVM_ASYNC_PF_EN = {DATA:#x} | "
                    + ("enabled | " if enable else "(not enabled) | ")
                    + "send always | deliver as interrupt; LAPIC enabled; then IF=1")
            if control:
                provider.fill(PROVIDED_PAGE - EXTRA_SLOT_GPA, page)
                t.host(f"page {PROVIDED_PAGE:#x} placed now (UFFDIO_COPY) before the guest touches it (control)")
            else:
                t.host(f"page {PROVIDED_PAGE:#x} is missing: userfaultfd serves it {DELAY * 1000:.0f} ms "
                       f"after the first fault")
            started = time.monotonic()
            stuck: RunTimeout | None = None
            with t.trace(*EVENTS) as recording, vcpu.stats.delta() as delta:
                try:
                    exit = run_until(vcpu, t, is_port(PORT_VALUE), limit=10)
                except RunTimeout as exc:
                    stuck = exc
            if stuck is not None:       # what the guest and KVM had done by then, for the reader of the failure
                raise RunTimeout(f"{stuck}; userfaults served meanwhile: "
                                 f"{_faults_in_words(provider.faults, started)}; {_progress(vm, recording)}",
                                 stuck.exit) from stuck
            elapsed = time.monotonic() - started
        assert isinstance(exit, IoExit)
        stats = t.stats("vCPU", delta, ("halt_exits", "halt_wakeup", "halt_successful_poll", "exits"))
        seen = dict(zip(RECORD_FIELDS, RECORD_LAYOUT.unpack(vm.memory.read(RECORD, RECORD_LAYOUT.size)), strict=True))
        faults = _faults(provider.faults, started)
    t.guest(f"#PF 'page not present': {seen['not_present']} (token {seen['not_present_token']:#x}); "
            f"'page ready' interrupts: {seen['ready']} ({seen['wake_all']} with the 'wake all' token "
            f"{WAKE_ALL_TOKEN:#x}; last token {seen['ready_token']:#x}); other #PF: "
            f"{seen['ordinary_pf']}; value read {seen['value']:#x}")
    t.add("note", f"KVM_RUN until the value: {elapsed * 1000:.0f} ms; userfaults: "
          + _faults_in_words(provider.faults, started))
    counts = {event.split(":")[1]: recording.count(event) for event in EVENTS} if recording else {}
    evidence.update(seen, **stats, faults=faults, run_ms=round(elapsed * 1000), traced=recording is not None,
                    **counts)
    evidence["async"] = any(f["thread"] != "the vCPU thread" for f in faults)
    t.outcome.evidence.update(evidence)
    return t, evidence


def _progress(vm: Any, recording: Any) -> str:
    """The guest's record, its async-PF slot and the trace so far: which step of the protocol did not happen."""
    seen = dict(zip(RECORD_FIELDS, RECORD_LAYOUT.unpack(vm.memory.read(RECORD, RECORD_LAYOUT.size)), strict=True))
    flags, token = struct.unpack("<II", vm.memory.read(DATA, 8))
    events = recording.summary() if recording is not None else "not traced"
    return (f"the guest saw {seen['not_present']} 'page not present' #PF (token {seen['not_present_token']:#x}) "
            f"and {seen['ready']} 'page ready' interrupts ({seen['wake_all']} 'wake all'; last token "
            f"{seen['ready_token']:#x}); its async-PF slot holds flags {flags:#x}, token {token:#x} (KVM delivers "
            f"the next 'page ready' only into a slot whose token is 0); trace: {events}")


def _faults(faults: list[PageFault], started: float) -> list[dict[str, str | float]]:
    """Who took each userfault (the vCPU thread or a kernel worker), and when after ``started``."""
    vcpu_thread = threading.get_native_id()
    return [{"thread": "the vCPU thread" if f.thread == vcpu_thread else f"kernel thread {f.thread}",
             "after_ms": round((f.time - started) * 1000)} for f in faults]


def _faults_in_words(faults: list[PageFault], started: float) -> str:
    return ", ".join(f"{f['thread']} at +{f['after_ms']} ms" for f in _faults(faults, started)) or "none"


@functools.cache
def _probe() -> tuple[tuple[str, object], ...]:
    t, evidence = _async_pf("APF_HALT", control=False, wait_for_ready=True)
    return tuple(evidence.items())


def asynchronous_faults() -> dict:
    """Measured once per process: a guest that enabled async PF touches a missing page; did a kernel worker
    take the fault (``async``), or the vCPU thread itself? The evidence of that run."""
    return dict(_probe())


def apf_ready(control: bool = False) -> ScenarioResult:
    """Enabling async PF, and each completed async PF, raise KVM_REQ_APF_READY: a "page ready" interrupt."""
    t, e = _async_pf("APF_READY", control, wait_for_ready=True, enable=not control)
    if control:
        t.add("note", "control: MSR_KVM_ASYNC_PF_EN written without the enable bit, and the page placed first")
    traced = not e["traced"] or e.get("kvm_async_pf_ready", 0) >= 1
    page_ready = e["not_present"] == 1 and e["ready_token"] == e["not_present_token"] and e["value"] == VALUE
    if e["async"]:
        seen = e["wake_all"] >= 1 and page_ready and traced
        why = ("'page ready' interrupts for the 'wake all' completion queued when the guest enabled async PF "
               "and for the page (token = CR2 of its 'page not present' #PF), each from KVM_REQ_APF_READY's "
               "handler (trace kvm_async_pf_ready)")
    else:
        seen = e["wake_all"] >= 1 and traced
        why = ("a 'page ready' interrupt with the 'wake all' token: enabling async PF queues that completion and "
               "raises KVM_REQ_APF_READY (trace kvm_async_pf_ready); this host has no asynchronous faults, so "
               "the page itself came synchronously")
    return t.verdict(seen, why)


def apf_halt(control: bool = False) -> ScenarioResult:
    """A guest retrying the access to a page still on its way: KVM raises KVM_REQ_APF_HALT and halts the vCPU."""
    probe = asynchronous_faults()
    if not probe["async"]:
        t = ScenarioRecorder("APF_HALT", control)
        t.outcome.evidence.update(probe)
        threads = ", ".join(str(fault["thread"]) for fault in probe["faults"]) or "no thread"
        t.add("note", f"probe: a guest with async PF enabled touched a page provided {DELAY * 1000:.0f} ms late; "
                      f"the userfault came from {threads}; KVM_RUN waited {probe['run_ms']} ms")
        return t.unreachable(
            "needs async page faults: this host resolves a missing page synchronously (measured now: the "
            f"userfault came from {threads} and KVM_RUN waited {probe['run_ms']} ms; no kvm_try_async_get_page, "
            "no 'page not present' #PF in the guest)")
    t, e = _async_pf("APF_HALT", control, wait_for_ready=False)
    if not e["traced"]:
        return t.verdict(False, f"needs trace events to see the repeated fault ({t.trace_problem})")
    seen = (e.get("kvm_async_pf_repeated_fault", 0) >= 1 and e["not_present"] == 1
            and e["run_ms"] >= DELAY * 1000 * 0.8 and e["value"] == VALUE)
    return t.verdict(seen, "kvm_async_pf_repeated_fault (the request is made there), then KVM_RUN stayed in the "
                           "kernel until the page arrived, with no exit, and the guest read the page")


REQUESTS = (
    request(
        "APF_HALT",
        "the MMU fault path (__kvm_mmu_faultin_pfn, mmu.c): a fault on a gfn with an async PF outstanding; "
        "kvm_arch_async_page_not_present() when 'page not present' cannot be delivered",
        "vcpu_enter_guest(): apf.halted = true, the vCPU blocks (vcpu_block) until the page is ready",
        "guest enables async PF, reads a userfaultfd page provided 300 ms late, and retries at once after "
        "'page not present'",
        "trace kvm_async_pf_not_present then kvm_async_pf_repeated_fault; KVM_RUN blocks ~300 ms with no exit",
        "A vCPU that faults on a page KVM is still fetching asynchronously cannot make progress; instead of "
        "spinning through the fault again, KVM raises KVM_REQ_APF_HALT (in the MMU fault path when the gfn "
        "already has an async PF in flight, or in kvm_arch_async_page_not_present() when the guest cannot "
        "take a 'page not present' #PF) and vcpu_enter_guest() turns it into a synthetic halt: the vCPU "
        "sleeps in the kernel, still able to take interrupts, until the worker's completion makes it "
        "runnable.",
        pvm=UNREACHABLE,
        amd=OBSERVED,
        needs="async page faults",
        intel=OBSERVED,
    ),
    request(
        "APF_READY",
        "kvm_arch_async_page_present_queued(): from async_pf_execute() (kernel worker, page now in memory) and "
        "kvm_async_pf_wakeup_all() (the guest enabling async PF, MSR_KVM_ASYNC_PF_EN)",
        "kvm_check_async_pf_completion(): maps the page, writes the token, injects the page-ready vector",
        "guest writes MSR 0x4b564d06 = vector, 0x4b564d02 = data | enable | send-always | as-int, sets IF, "
        "reads a userfaultfd page provided 300 ms late and waits in hlt for its token",
        "guest: a page-ready interrupt with the 'wake all' token 0xffffffff; where faults are asynchronous also "
        "a #PF with CR2 = token and a page-ready interrupt with that token; trace kvm_async_pf_ready",
        "With async page faults a guest is told a page is missing (a #PF whose CR2 is a token, 'flags' = 1 "
        "in its shared area) and runs something else. When the kernel worker has brought the page in it "
        "queues a completion and raises KVM_REQ_APF_READY; before the next entry "
        "kvm_check_async_pf_completion() maps the page, writes the token into the shared area and injects "
        "the vector the guest chose in MSR_KVM_ASYNC_PF_INT. The guest clears the token and writes "
        "MSR_KVM_ASYNC_PF_ACK, which raises the request again for the next completion. Enabling async PF "
        "queues a 'wake all' completion (token 0xffffffff) the same way, so a guest that re-enables it "
        "releases every task still waiting for a page: that path raises the request even on a host whose "
        "faults are never asynchronous.",
        pvm=OBSERVED,
        amd=OBSERVED,
        needs="async page faults",
        intel=OBSERVED,
    ),
)
SCENARIOS: dict[str, Callable[..., ScenarioResult]] = {"APF_HALT": apf_halt, "APF_READY": apf_ready}
