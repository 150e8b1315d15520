"""The clock requests: kvmclock, the master clock, steal time and timer migration."""

from __future__ import annotations

from collections.abc import Callable

import pykvm
from pykvm import x86

from .common import (
    DATA,
    MSR_KVM_STEAL_TIME,
    MSR_KVM_SYSTEM_TIME_NEW,
    OBSERVED,
    PORT_READY,
    PVCLOCK,
    PVCLOCK_GUEST_STOPPED,
    Outcome,
    Timeline,
    is_port,
    machine,
    request,
    run_until,
)

# ---- CLOCK_UPDATE ----------------------------------------------------------------

CLOCK_GUEST = f"""
        mov ${MSR_KVM_SYSTEM_TIME_NEW:#x}, %ecx
        mov ${DATA | 1:#x}, %eax      # kvmclock record at DATA, enabled
        xor %edx, %edx
        wrmsr
loop:   out %al, $0x10
        jmp loop
"""


def read_pvclock(vm: pykvm.Vm) -> dict[str, int]:
    version, _, tsc, system_time, mul, shift, flags = PVCLOCK.unpack(vm.memory.read(DATA, PVCLOCK.size))
    return {"version": version, "tsc_timestamp": tsc, "system_time": system_time, "flags": flags}


def clock_update(control: bool = False) -> Outcome:
    """KVM_SET_CLOCK and KVM_KVMCLOCK_CTRL raise KVM_REQ_CLOCK_UPDATE: the guest's kvmclock record is rewritten."""
    t = Timeline("CLOCK_UPDATE", control)
    with machine() as (vm, vcpu):
        x86.load_code(vcpu, CLOCK_GUEST)
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


def steal_update(control: bool = False) -> Outcome:
    """Every vCPU load raises KVM_REQ_STEAL_UPDATE; with MSR_KVM_STEAL_TIME on, each entry rewrites the record."""
    t = Timeline("STEAL_UPDATE", control)
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
            "the steal-time record's version grows by 2 per KVM_RUN",
        )


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
    ),
    request(
        "GLOBAL_CLOCK_UPDATE",
        "guest write of MSR_KVM_SYSTEM_TIME_NEW, vCPU load on a new host CPU",
        "kvm_gen_kvmclock_update()",
        "guest writes MSR 0x4b564d01",
        "kvm_pvclock_update now and ~0.1 s later with no guest action",
        "Raises KVM_REQ_CLOCK_UPDATE on this vCPU now and, through delayed work 100 ms later, on every vCPU of "
        "the VM, so all vCPUs' kvmclock pages agree.",
    ),
    request(
        "MASTERCLOCK_UPDATE",
        "host clocksource change, IA32_TSC writes, KVM_SET_CLOCK",
        "kvm_update_masterclock()",
        "guest writes MSR 0x12 then 0x4b564d01; host sets IA32_TSC",
        "trace kvm_update_master_clock; pvclock TSC_STABLE 0->1",
        "Recomputes the VM-wide master clock (one host TSC/ns pair every vCPU's kvmclock derives from) and "
        "then every vCPU's clock: what makes a guest's kvmclock monotonic across vCPUs.",
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
    ),
    request(
        "MIGRATE_TIMER",
        "vCPU load on a different host CPU",
        "__kvm_migrate_timers()",
        "LAPIC one-shot timer armed; sched_setaffinity to the other CPU between runs",
        "trace timer:hrtimer_start function=apic_timer_fn on the new CPU",
        "Moves the vCPU's hrtimers (LAPIC timer, PIT) to the host CPU the vCPU now runs on, so their expiry "
        "interrupts the right CPU.",
    ),
)
SCENARIOS: dict[str, Callable[..., Outcome]] = {"CLOCK_UPDATE": clock_update, "STEAL_UPDATE": steal_update}
