"""The Hyper-V requests: crash and reset MSRs, SynIC exits, synthetic timers.

Why this exists: KVM emulates parts of Microsoft's Hyper-V interface (the
MSRs at 0x40000000 and up) for Windows and Linux guests that use it. A guest
write to one of these MSRs often needs work outside the WRMSR's own path (a
userspace exit, a timer): hyperv.c raises a request and vcpu_enter_guest()
does the work before the next entry. Each scenario gives its vCPU the Hyper-V
CPUID leaves KVM reports (``kvm.supported_hv_cpuid``), without which KVM
refuses the guest's Hyper-V MSR accesses.
"""

from __future__ import annotations

import enum
import struct
import time
from collections.abc import Callable

import pykvm
from pykvm import Cap, x86
from pykvm.core.constants import HypervExitType, SystemEventType
from pykvm.core.exits import Exit, HypervExit, SystemEventExit
from pykvm.irqchip import lapic
from pykvm.irqchip.lapic import ApicReg

from .common import (
    DATA,
    OBSERVED,
    PORT_READY,
    UNREACHABLE,
    ScenarioRecorder,
    ScenarioResult,
    io_port,
    machine,
    request,
    run_until,
)


class HvMsr(enum.IntEnum):
    """The Hyper-V MSRs the scenarios use (Hyper-V TLFS numbering, as in KVM's hyperv-tlfs.h)."""

    GUEST_OS_ID = 0x40000000
    RESET = 0x40000003
    TIME_REF_COUNT = 0x40000020
    SCONTROL = 0x40000080
    SIMP = 0x40000083
    SINT0 = 0x40000090
    STIMER0_CONFIG = 0x400000B0
    STIMER0_COUNT = 0x400000B1
    CRASH_P0 = 0x40000100
    CRASH_CTL = 0x40000105


CRASH_NOTIFY = 1 << 63             # CRASH_CTL: the guest crashed, the parameters are in P0..P4
CRASH_PARAMS = tuple(range(0xC0DE0000, 0xC0DE0005))
STIMER_SINT = 2                    # the synthetic interrupt source the timer's message goes to
STIMER_VECTOR = 0x40               # SINT2's vector
STIMER_DELAY = 500_000             # 50 ms in the reference counter's 100 ns units
HVMSG_TIMER_EXPIRED = 0x80000010
# struct hv_message: header { u32 type; u8 payload_size; u8 flags; u16; u64 sender }, then
# struct hv_timer_message_payload { u32 timer_index; u32; u64 expiration_time; u64 delivery_time }
TIMER_MESSAGE = struct.Struct("<IBB2xQI4xQQ")
MESSAGE_SLOT = DATA + STIMER_SINT * 256   # the SIMP page holds one 256-byte message per SINT


def hyperv_missing(synic: bool = False) -> str:
    """Why this host cannot run a Hyper-V scenario ('' when it can), checked now."""
    with pykvm.Kvm() as kvm:
        return _hyperv_missing(kvm, synic)


def _hyperv_missing(kvm: pykvm.Kvm, synic: bool) -> str:
    if not kvm.check_extension(Cap.SYS_HYPERV_CPUID):
        return ("needs Hyper-V emulation: this host has no KVM_CAP_SYS_HYPERV_CPUID "
                "(KVM_GET_SUPPORTED_HV_CPUID, checked now)")
    if synic and not kvm.check_extension(Cap.HYPERV_SYNIC):
        return "needs the Hyper-V SynIC: this host has no KVM_CAP_HYPERV_SYNIC (checked now)"
    return ""


def give_hyperv_cpuid(vcpu: pykvm.Vcpu) -> None:
    """Replace the vCPU's 0x4000xxxx leaves with KVM's Hyper-V ones (before its first run)."""
    hv = vcpu.vm.kvm.supported_hv_cpuid
    leaves = {(entry.function, entry.index) for entry in hv}
    vcpu.set_cpuid([entry for entry in vcpu.cpuid if (entry.function, entry.index) not in leaves] + list(hv))


def wrmsr(msr: int, value: int) -> str:
    """Guest code writing ``value`` to ``msr``."""
    return (f"mov ${msr:#x}, %ecx\n        mov ${value & 0xFFFFFFFF:#x}, %eax\n"
            f"        mov ${value >> 32:#x}, %edx\n        wrmsr\n")


LOOP = f"""
loop:   out %al, ${PORT_READY:#x}
        jmp loop
"""


def until_event_or_ready(exit: Exit) -> bool:
    return isinstance(exit, SystemEventExit) or io_port(exit) == PORT_READY


# ---- HV_CRASH and HV_RESET ---------------------------------------------------------

def crash_guest(trigger: bool) -> str:
    params = "".join("        " + wrmsr(HvMsr.CRASH_P0 + i, value) for i, value in enumerate(CRASH_PARAMS))
    crash = "        " + wrmsr(HvMsr.CRASH_CTL, CRASH_NOTIFY) if trigger else ""
    return params + crash + LOOP


def hv_crash(control: bool = False) -> ScenarioResult:
    """A guest write of CRASH_CTL with CRASH_NOTIFY raises KVM_REQ_HV_CRASH: a SYSTEM_EVENT exit of type CRASH."""
    t = ScenarioRecorder("HV_CRASH", control)
    if missing := hyperv_missing():
        return t.unreachable(missing)
    with machine() as (vm, vcpu):
        give_hyperv_cpuid(vcpu)
        x86.load_code(vcpu, crash_guest(not control))
        t.host("Hyper-V CPUID leaves set; the guest writes CRASH_P0..P4 (0x40000100..4)"
               + (" and nothing else (control)" if control else ", then CRASH_CTL (0x40000105) = bit 63"))
        exit = run_until(vcpu, t, until_event_or_ready)
        params = vcpu.get_msrs(range(HvMsr.CRASH_P0, HvMsr.CRASH_P0 + 5))
        t.host("KVM_GET_MSRS CRASH_P0..P4: " + ", ".join(f"{value:#x}" for value in params.values()))
        kind = exit.type if isinstance(exit, SystemEventExit) else None
        t.outcome.evidence.update(system_event=kind, params=list(params.values()))
        return t.verdict(kind == SystemEventType.CRASH,
                         "KVM_EXIT_SYSTEM_EVENT type CRASH; the crash parameters readable with KVM_GET_MSRS")


def hv_reset(control: bool = False) -> ScenarioResult:
    """A guest write of 1 to HV_X64_MSR_RESET raises KVM_REQ_HV_RESET: a SYSTEM_EVENT exit of type RESET."""
    t = ScenarioRecorder("HV_RESET", control)
    if missing := hyperv_missing():
        return t.unreachable(missing)
    with machine() as (vm, vcpu):
        give_hyperv_cpuid(vcpu)
        x86.load_code(vcpu, ("" if control else wrmsr(HvMsr.RESET, 1)) + LOOP)
        t.host("Hyper-V CPUID leaves set; the guest "
               + ("loops without touching the reset MSR (control)" if control else "writes RESET (0x40000003) = 1"))
        exit = run_until(vcpu, t, until_event_or_ready)
        kind = exit.type if isinstance(exit, SystemEventExit) else None
        t.outcome.evidence.update(system_event=kind)
        return t.verdict(kind == SystemEventType.RESET, "KVM_EXIT_SYSTEM_EVENT type RESET")


# ---- HV_EXIT -----------------------------------------------------------------------

def synic_machine_setup(vcpu: pykvm.Vcpu) -> None:
    give_hyperv_cpuid(vcpu)
    vcpu.enable_cap(Cap.HYPERV_SYNIC)


def hv_exit(control: bool = False) -> ScenarioResult:
    """A guest write of a SynIC MSR raises KVM_REQ_HV_EXIT: KVM_EXIT_HYPERV (SYNIC) tells userspace."""
    t = ScenarioRecorder("HV_EXIT", control)
    if missing := hyperv_missing(synic=True):
        return t.unreachable(missing)
    with machine(irqchip="kernel") as (vm, vcpu):
        synic_machine_setup(vcpu)
        x86.load_code(vcpu, ("" if control else wrmsr(HvMsr.SCONTROL, 1)) + LOOP)
        t.host("in-kernel irqchip; Hyper-V CPUID; KVM_ENABLE_CAP KVM_CAP_HYPERV_SYNIC on the vCPU; the guest "
               + ("loops without touching the SynIC (control)" if control else "writes SCONTROL (0x40000080) = 1"))
        exit = run_until(vcpu, t, lambda exit: isinstance(exit, HypervExit) or io_port(exit) == PORT_READY)
        hyperv = exit if isinstance(exit, HypervExit) else None
        t.outcome.evidence.update(
            hyperv_exit=hyperv is not None,
            type=hyperv.type if hyperv else None,
            msr=hyperv.msr if hyperv else None,
            control=hyperv.control if hyperv else None)
        seen = hyperv is not None and hyperv.type == HypervExitType.SYNIC and hyperv.msr == HvMsr.SCONTROL
        return t.verdict(seen, "KVM_EXIT_HYPERV type SYNIC, msr 0x40000080, control 1")


# ---- HV_STIMER ---------------------------------------------------------------------

def stimer_guest(trigger: bool) -> str:
    arm = f"""
        mov ${HvMsr.TIME_REF_COUNT:#x}, %ecx
        rdmsr                               # the partition's reference time, 100 ns units
        add ${STIMER_DELAY}, %eax
        adc $0, %edx
        mov ${HvMsr.STIMER0_COUNT:#x}, %ecx  # one-shot: the absolute expiry time
        wrmsr
        {wrmsr(HvMsr.STIMER0_CONFIG, 1 | STIMER_SINT << 16)}""" if trigger else ""
    return ("        " + wrmsr(HvMsr.SCONTROL, 1) + "        " + wrmsr(HvMsr.SIMP, DATA | 1)
            + "        " + wrmsr(HvMsr.SINT0 + STIMER_SINT, STIMER_VECTOR) + arm + LOOP)


def read_timer_message(vm: pykvm.Vm) -> dict[str, int]:
    kind, size, flags, _, index, expiration, delivery = TIMER_MESSAGE.unpack(
        vm.memory.read(MESSAGE_SLOT, TIMER_MESSAGE.size))
    return {"type": kind, "payload_size": size, "timer_index": index, "expiration_time": expiration,
            "delivery_time": delivery}


def hv_stimer(control: bool = False) -> ScenarioResult:
    """An expired synthetic timer raises KVM_REQ_HV_STIMER: KVM posts the timer message in the SIMP page."""
    t = ScenarioRecorder("HV_STIMER", control)
    if missing := hyperv_missing(synic=True):
        return t.unreachable(missing)
    with machine(irqchip="kernel") as (vm, vcpu):
        synic_machine_setup(vcpu)
        vcpu.set_lapic(lapic.read(vcpu).with_register(ApicReg.SVR, 0x1FF))   # software-enabled
        x86.load_code(vcpu, stimer_guest(not control))
        t.host(f"SynIC on; the guest enables SCONTROL, SIMP at {DATA:#x}, SINT{STIMER_SINT} = vector "
               f"{STIMER_VECTOR:#x}" + ("; no timer armed (control)" if control else
                                        "; STIMER0 one-shot at TIME_REF_COUNT + 50 ms, SINT2"))
        events = ("kvm:kvm_hv_stimer_start_one_shot", "kvm:kvm_hv_stimer_callback", "kvm:kvm_hv_stimer_expiration")
        with t.trace(*events) as recording:
            started = time.monotonic()
            run_until(vcpu, t, lambda exit: io_port(exit) == PORT_READY)
            count, config = vcpu.get_msrs([HvMsr.STIMER0_COUNT, HvMsr.STIMER0_CONFIG]).values()
            t.host(f"KVM_GET_MSRS: STIMER0_COUNT {count}, STIMER0_CONFIG {config:#x}")
            message = read_timer_message(vm)
            runs = 0
            deadline = started + (1.0 if control else 10.0)
            while message["type"] == 0 and time.monotonic() < deadline:
                time.sleep(0.005)
                vcpu.run()                  # the guest's loop: each entry handles pending requests
                runs += 1
                message = read_timer_message(vm)
            waited = time.monotonic() - started
        config_after = vcpu.get_msrs([HvMsr.STIMER0_CONFIG])[HvMsr.STIMER0_CONFIG]
        irr = STIMER_VECTOR in lapic.read(vcpu).irr
        t.guest(f"after {waited * 1000:.0f} ms ({runs} more entries): SIMP slot {STIMER_SINT}: type "
                f"{message['type']:#x}, timer {message['timer_index']}, expiration {message['expiration_time']}, "
                f"delivered at {message['delivery_time']}; STIMER0_CONFIG {config_after:#x}; vector "
                f"{STIMER_VECTOR:#x} in the LAPIC's IRR: {irr}")
        fired = {name: recording.count(name) for name in events} if recording else None
        t.outcome.evidence.update(message=message, count=count, config_after=config_after, vector_pending=irr,
                                  trace=fired)
        seen = (message["type"] == HVMSG_TIMER_EXPIRED and message["expiration_time"] == count > 0
                and message["delivery_time"] >= count)
        return t.verdict(seen, "the SynIC timer message (HVMSG_TIMER_EXPIRED, timer 0, expiration = the armed "
                               "count) in the guest's SIMP page; trace kvm_hv_stimer_start_one_shot and "
                               "kvm_hv_stimer_expiration")


REQUESTS = (
    request(
        "HV_CRASH",
        "kvm_hv_set_msr_pw() (hyperv.c): a guest write of HV_X64_MSR_CRASH_CTL with CRASH_NOTIFY",
        "vcpu_enter_guest(): KVM_EXIT_SYSTEM_EVENT type KVM_SYSTEM_EVENT_CRASH",
        "Hyper-V CPUID; the guest writes CRASH_P0..P4, then CRASH_CTL (0x40000105) = bit 63",
        "SystemEventExit type CRASH; KVM_GET_MSRS returns the five crash parameters",
        "Hyper-V lets a crashing guest report why: it writes five parameters (for Windows, the bug check code "
        "and its arguments) to CRASH_P0..P4 and sets CRASH_NOTIFY in CRASH_CTL. The WRMSR is handled deep in "
        "the MSR emulation path, where KVM cannot leave to userspace, so hyperv.c raises KVM_REQ_HV_CRASH; "
        "vcpu_enter_guest() sees it before the next entry and returns to userspace with a SYSTEM_EVENT exit "
        "of type CRASH, and the VMM reads the parameters with KVM_GET_MSRS (to log them, or to dump the guest).",
        pvm=UNREACHABLE,
        amd=OBSERVED,
        needs="Hyper-V emulation",
        intel=OBSERVED,
    ),
    request(
        "HV_RESET",
        "kvm_hv_set_msr_pw() (hyperv.c): a guest write of 1 to HV_X64_MSR_RESET",
        "vcpu_enter_guest(): KVM_EXIT_SYSTEM_EVENT type KVM_SYSTEM_EVENT_RESET",
        "Hyper-V CPUID; the guest writes RESET (0x40000003) = 1",
        "SystemEventExit type RESET",
        "Hyper-V's reset MSR is how an enlightened guest asks for a reboot of the whole partition. Resetting "
        "the machine is userspace's job (devices, firmware, every vCPU), so the MSR write only raises "
        "KVM_REQ_HV_RESET and vcpu_enter_guest() turns it into a SYSTEM_EVENT exit of type RESET, the same "
        "exit a PSCI or ACPI reset gives on other paths.",
        pvm=UNREACHABLE,
        amd=OBSERVED,
        needs="Hyper-V emulation",
        intel=OBSERVED,
    ),
    request(
        "HV_EXIT",
        "synic_exit() (hyperv.c): a guest write of SCONTROL, SIEFP or SIMP with the SynIC enabled",
        "vcpu_enter_guest(): KVM_EXIT_HYPERV type KVM_EXIT_HYPERV_SYNIC with the SynIC's registers",
        "in-kernel irqchip, KVM_ENABLE_CAP KVM_CAP_HYPERV_SYNIC on the vCPU; the guest writes SCONTROL "
        "(0x40000080) = 1",
        "HypervExit type SYNIC, msr 0x40000080, control 1",
        "The SynIC (synthetic interrupt controller) is emulated in KVM, but the VMM must know where the guest "
        "put its event-flags and message pages and whether the SynIC is on (it posts messages there for its "
        "own devices, e.g. VMBus). So when the guest writes SCONTROL, SIEFP or SIMP, synic_exit() records the "
        "new values and raises KVM_REQ_HV_EXIT, and vcpu_enter_guest() returns to userspace with "
        "KVM_EXIT_HYPERV (type SYNIC: the MSR and the three registers) before the guest runs again.",
        pvm=UNREACHABLE,
        amd=OBSERVED,
        needs="Hyper-V emulation",
        intel=OBSERVED,
    ),
    request(
        "HV_STIMER",
        "stimer_mark_pending() (hyperv.c): a synthetic timer enabled by the guest, or its hrtimer expiring",
        "kvm_hv_process_stimers(): starts the timer, or posts its expiry message to the SynIC",
        "SynIC on, SIMP page and SINT2 set; the guest arms STIMER0 one-shot at TIME_REF_COUNT + 50 ms",
        "the HVMSG_TIMER_EXPIRED message in the guest's SIMP page (expiration = the armed count); trace "
        "kvm_hv_stimer_start_one_shot and kvm_hv_stimer_expiration",
        "Hyper-V's synthetic timers count the partition's reference time (100 ns units); when one expires, "
        "the SynIC writes a timer message into the guest's message page and raises the timer's SINT vector. "
        "Both ends happen on the vCPU's thread: enabling a timer and its hrtimer firing (in interrupt context) "
        "only set the timer's pending bit and raise KVM_REQ_HV_STIMER; before the next entry "
        "kvm_hv_process_stimers() starts the hrtimer, or, once the expiry time has passed, writes the message "
        "and injects the vector through the in-kernel LAPIC.",
        pvm=UNREACHABLE,
        amd=OBSERVED,
        needs="Hyper-V emulation",
        intel=OBSERVED,
    ),
)
SCENARIOS: dict[str, Callable[..., ScenarioResult]] = {
    "HV_CRASH": hv_crash, "HV_RESET": hv_reset, "HV_EXIT": hv_exit, "HV_STIMER": hv_stimer}
