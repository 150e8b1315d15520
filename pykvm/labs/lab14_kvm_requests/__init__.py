"""Lab 14, KVM's requests: which host action makes which KVM_REQ_*, and the evidence that KVM handled it.

Each run asks for two requests, drawn from those pykvm's request table
(:mod:`pykvm.requests`) has observed on this kind of host. For each, the
checker builds a small sandbox guest, measures a control window with no host
action, then calls the student's ``trigger(task)`` and measures the same
window again: the vCPU and VM stats-fd counters, the exits, what the guest's
handlers reported and its kvmclock record. It judges which evidence moved,
never what ``trigger()`` returns; ``evidence(name)`` is the student's
prediction of it, compared with the measurement.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from ...core.constants import Cap, MsrExitReason
from ...core.errors import PyKvmError
from ...core.exits import IoExit, MsrExit, ShutdownExit
from ...core.system import Kvm
from ...core.vcpu import Vcpu
from ...core.vm import Vm
from ...requests import BY_NAME, NOT_IMPLEMENTED, OBSERVED, expected
from ...requests.scenarios.common import DATA, MSR_KVM_SYSTEM_TIME_NEW, PVCLOCK, PVCLOCK_GUEST_STOPPED
from ...x86.modes import load_code
from ...x86.vectors import Vector
from ..framework import Context, Fail, Lab, Step, StudentError, lab_folder

PORT_LOOP, PORT_HANDLER = 0x10, 0x11
LOOP_MSR = 0x10               # IA32_TIME_STAMP_COUNTER: the MSR the guest reads in its loop
WINDOW_RUNS = 4               # KVM_RUNs measured after the action (one host batches guest code: one late)
CLOCK_JUMP_NS = 500_000_000   # a kvmclock system_time move beyond the elapsed time that no idle guest shows

# What the guest runs: kvmclock on, IF=1, then a loop that reads an MSR and reports at PORT_LOOP.
# The handlers report their vector at PORT_HANDLER.
SANDBOX = f"""
start:  mov ${MSR_KVM_SYSTEM_TIME_NEW:#x}, %ecx
        mov ${DATA | 1:#x}, %eax        # kvmclock record at DATA, enabled
        xor %edx, %edx
        wrmsr
        sti
loop:   mov ${LOOP_MSR:#x}, %ecx
        rdmsr
        out %al, ${PORT_LOOP:#x}
        jmp loop
irq:    mov $VECTOR, %eax
        out %al, ${PORT_HANDLER:#x}
        iretq
nmi:    mov ${int(Vector.NMI)}, %eax
        out %al, ${PORT_HANDLER:#x}
        iretq
"""

# The evidence each request leaves, named as the student names it (sheet, 'Evidence').
EVIDENCE = {
    "EVENT": "irq_injections",
    "NMI": "nmi_injections",
    "TLB_FLUSH": "remote_tlb_flush_requests",
    "TRIPLE_FAULT": "KVM_EXIT_SHUTDOWN",
    "MSR_FILTER_CHANGED": "KVM_EXIT_X86_RDMSR",
    "CLOCK_UPDATE": "kvmclock",
}
# The capabilities each request's host action needs.
NEEDS = {
    "EVENT": (), "NMI": (Cap.USER_NMI,), "TLB_FLUSH": (), "TRIPLE_FAULT": (Cap.X86_TRIPLE_FAULT_EVENT,),
    "MSR_FILTER_CHANGED": (Cap.X86_MSR_FILTER,), "CLOCK_UPDATE": (Cap.ADJUST_CLOCK,),
}
ASKED = 2                     # requests per run


@dataclasses.dataclass
class KvmRequestTask:
    name: str                 # the request, without KVM_REQ_
    vm: Vm
    vcpu: Vcpu                # stopped at the guest's `out` in its loop (IF=1)
    vector: int               # the guest has a handler for this interrupt vector (and for the NMI)
    msr: int                  # the MSR the guest reads in its loop

    def __repr__(self) -> str:
        return f"KvmRequestTask(name={self.name!r}, vector={self.vector:#x}, msr={self.msr:#x})"


def available(kvm: Kvm) -> list[str]:
    """The requests this lab can ask for here: their capabilities present, and not measured absent on this host."""
    return [name for name in EVIDENCE
            if all(kvm.check_extension(cap) for cap in NEEDS[name])
            and expected(BY_NAME[name]) in (OBSERVED, NOT_IMPLEMENTED)]


def _asked(ctx: Context) -> list[str]:
    with Kvm() as kvm:
        names = available(kvm)
    if not names:
        caps = sorted({cap.name for needs in NEEDS.values() for cap in needs})
        raise Fail(f"this host can raise none of {', '.join(EVIDENCE)} here (capabilities: {', '.join(caps)})")
    rng = ctx.random("trigger")
    return rng.sample(names, ASKED) if len(names) >= ASKED else [rng.choice(names) for _ in range(ASKED)]


def _pvclock(vm: Vm) -> tuple[int, int, int]:
    version, _, _, system_time, _, _, flags = PVCLOCK.unpack(vm.memory.read(DATA, PVCLOCK.size))
    return version, system_time, flags


def _window(vm: Vm, vcpu: Vcpu, action: Callable[[], None]) -> dict:
    """Everything the lab counts as evidence, over ``action()`` and the next few runs of the guest."""
    version, system_time, flags = _pvclock(vm)
    started = time.monotonic_ns()
    exits: list[str] = []
    handled: list[int] = []
    with vm.stats.delta() as vm_delta, vcpu.stats.delta() as vcpu_delta:
        action()
        for _ in range(WINDOW_RUNS):
            exit = vcpu.run()
            if isinstance(exit, IoExit) and exit.port == PORT_HANDLER:
                handled.append(exit.value & 0xFF)
            if isinstance(exit, ShutdownExit):
                exits.append("KVM_EXIT_SHUTDOWN")
                break
            if isinstance(exit, MsrExit):
                exits.append("KVM_EXIT_X86_RDMSR" if not exit.is_write else "KVM_EXIT_X86_WRMSR")
                break
    elapsed = time.monotonic_ns() - started
    new_version, new_time, new_flags = _pvclock(vm)
    moved_ns = new_time - system_time - elapsed
    rewritten = new_version != version and (abs(moved_ns) > CLOCK_JUMP_NS or
                                            bool(new_flags & ~flags & PVCLOCK_GUEST_STOPPED))
    seen = {
        "irq_injections": vcpu_delta.get("irq_injections", 0),
        "nmi_injections": vcpu_delta.get("nmi_injections", 0),
        "remote_tlb_flush_requests": vm_delta.get("remote_tlb_flush_requests", 0),
        "KVM_EXIT_SHUTDOWN": int("KVM_EXIT_SHUTDOWN" in exits),
        "KVM_EXIT_X86_RDMSR": int("KVM_EXIT_X86_RDMSR" in exits),
        "kvmclock": int(rewritten),
    }
    return {"seen": seen, "handled": handled, "clock": (new_version - version, moved_ns, new_flags)}


def _moved(window: dict) -> list[str]:
    return [name for name, count in window["seen"].items() if count]


def _scenario(index: int) -> Callable[[Context], dict]:
    def scenario(ctx: Context) -> dict:
        name = _asked(ctx)[index]
        vector = ctx.random(f"trigger:{index}").randrange(0x30, 0xF0)
        ctx.load()
        with Kvm() as kvm, kvm.create_vm() as vm:
            vcpu = vm.create_vcpu()
            if kvm.check_extension(Cap.X86_USER_SPACE_MSR):
                vm.enable_user_space_msr(MsrExitReason.FILTER)   # a filtered RDMSR exits to userspace
            load_code(vcpu, SANDBOX.replace("VECTOR", hex(vector)), handlers={vector: "irq", Vector.NMI: "nmi"})
            for _ in range(WINDOW_RUNS):                           # to the loop's first report: IF=1, kvmclock on
                exit = vcpu.run()
                if isinstance(exit, IoExit) and exit.port == PORT_LOOP:
                    break
            else:
                raise Fail(f"the checker's sandbox guest did not reach its loop (last exit {exit!r})")
            control = _window(vm, vcpu, lambda: None)
            task = KvmRequestTask(name, vm, vcpu, vector, LOOP_MSR)

            def action() -> None:
                ctx.call("trigger", task)
            try:
                window = _window(vm, vcpu, action)
            except PyKvmError as exc:     # the guest's run after the student's action failed: their doing
                raise Fail(f"after trigger({task!r}) running the guest failed: {type(exc).__name__}: {exc}") \
                    from None
            return {"name": name, "task": task, "control": control, "window": window}
    return scenario


def _describe(window: dict) -> str:
    moved = [f"{name} +{window['seen'][name]}" if name.islower() else name for name in _moved(window)]
    handled = f"; the guest's handlers reported vectors {[hex(v) for v in window['handled']]}" \
        if window["handled"] else ""
    return (", ".join(moved) or "nothing moved") + handled


def _check(index: int) -> Callable[[Context], str]:
    def check(ctx: Context) -> str:
        run = ctx.once(f"trigger:{index}", _scenario(index))
        name = run["name"]
        wanted = EVIDENCE[name]
        control, window = run["control"], run["window"]
        if _moved(control):
            raise Fail(f"the checker's control window (no host action) already moved {_describe(control)}: "
                       f"this host is too busy to judge KVM_REQ_{name} now; check again")
        if not window["seen"][wanted]:
            others = [request for request, evidence in EVIDENCE.items() if evidence in _moved(window)]
            raised = f": that is the evidence of KVM_REQ_{', KVM_REQ_'.join(others)}" if others else ""
            raise Fail(f"asked for KVM_REQ_{name}; after trigger() the checker saw {_describe(window)}{raised}",
                       f"KVM_REQ_{name}: `python -m pykvm.requests show {name}` raises it and shows its "
                       f"evidence; which ioctl in its timeline is the host's action?")
        return f"KVM_REQ_{name}: {_describe(window)} (control window: nothing)"
    return check


def check_predictions(ctx: Context) -> str:
    runs = [ctx.once(f"trigger:{index}", _scenario(index)) for index in range(ASKED)]
    said = []
    for index, run in enumerate(runs):
        name = run["name"]
        prediction = ctx.call("evidence", name)
        moved = _moved(run["window"])
        if EVIDENCE[name] not in moved:
            raise StudentError(f"not checked: step {index + 1} failed (your trigger() did not raise "
                               f"KVM_REQ_{name}, so there is nothing to compare evidence({name!r}) with)")
        if prediction not in EVIDENCE.values():
            raise Fail(f"evidence({name!r}) returned {prediction!r}, which is none of the names the checker "
                       f"measures: {', '.join(sorted(EVIDENCE.values()))}")
        if prediction not in moved:
            raise Fail(f"evidence({name!r}) said {prediction!r}, but in your run of KVM_REQ_{name} that did "
                       f"not move; what moved: {', '.join(moved) or 'nothing'}")
        if prediction != EVIDENCE[name]:
            raise Fail(f"evidence({name!r}) said {prediction!r}: it moved in your run, but it is not what "
                       f"KVM_REQ_{name} itself leaves (it moved for another reason)")
        said.append(f"{name} -> {prediction}")
    return "; ".join(said)


TRIGGER_HINT = ("`python -m pykvm.requests` lists the requests; `show NAME` prints the host action that raises "
                "it and the evidence KVM leaves; task.vm and task.vcpu are yours to act on, but do not run the "
                "vCPU: the checker does")

LAB = Lab(
    number=14, title="KVM's requests", minutes=45, folder=lab_folder(__file__),
    teaches="KVM_REQ_* bits checked before every guest entry; which host ioctl raises which request; "
            "evidence in the vCPU and VM stats fds, the exits and the guest; control windows",
    requires=(Cap.USER_MEMORY,),
    steps=(
        Step("trigger() raises the first request asked", _check(0), TRIGGER_HINT),
        Step("trigger() raises the second request asked", _check(1), TRIGGER_HINT),
        Step("evidence() names what each request leaves", check_predictions,
             "the table's 'evidence' column (python -m pykvm.requests show NAME) names it; use the "
             "names listed in the sheet, 'Evidence'"),
    ),
)
