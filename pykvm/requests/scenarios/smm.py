"""SMI and VM_DEAD: system-management mode, and the VM KVM gives up on.

Why this exists: KVM_REQ_SMI is how an SMI (``KVM_SMI``, or an SMI IPI from
the LAPIC) reaches a vCPU; at the next entry KVM saves the vCPU's state into
SMRAM and starts the guest's SMM handler. A vCPU in SMM sees only memory slots
of address space 1, so SMRAM lives there. The same code path, with no SMRAM
to save into, is a reliable way to make KVM give up on a VM (kvm_vm_dead(),
KVM_REQ_VM_DEAD): these two scenarios share it.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pykvm
from pykvm import Cap, x86
from pykvm.core.errors import KvmError, KvmVmDead

from .common import (
    OBSERVED,
    PORT_HANDLER,
    PORT_READY,
    UNREACHABLE,
    ScenarioRecorder,
    ScenarioResult,
    io_port,
    is_port,
    machine,
    request,
    run_until,
)

SMBASE = 0x30000             # the architectural SMBASE after reset
SMRAM_SIZE = 0x10000         # SMBASE .. +64 KiB: the handler at +0x8000, the state-save area at +0xFE00
SMM_ENTRY = SMBASE + 0x8000
SAVED_RIP = SMBASE + 0xFF78  # the interrupted RIP in KVM's 64-bit state-save layout (offset 0x7F78 of 0x7E00..)
SMM_MARKER = 0x534D          # "SM": written by the handler into SMRAM and reported on PORT_HANDLER
MARKER_ADDRESS = SMBASE + 0x100

# The SMM handler: 16-bit code with CS.base = SMBASE, IP = 0x8000, data segments based at 0, 4 GiB limits.
SMM_HANDLER = f"""
        movw ${SMM_MARKER:#x}, %cs:{MARKER_ADDRESS - SMBASE:#x}   # a marker in SMRAM
        mov ${SMM_MARKER:#x}, %ax
        out %ax, ${PORT_HANDLER:#x}
        rsm                                 # KVM restores the long-mode state it saved
"""
LOOP_GUEST = f"""
loop:   out %al, ${PORT_READY:#x}
        jmp loop
"""


def smm_missing() -> str:
    """Why this host cannot run an SMM scenario ('' when it can), checked now."""
    with pykvm.Kvm() as kvm:
        return _smm_missing(kvm)


def _smm_missing(kvm: pykvm.Kvm) -> str:
    if not kvm.check_extension(Cap.X86_SMM):
        return "needs SMM: this host has no KVM_CAP_X86_SMM (checked now)"
    if kvm.check_extension(Cap.MULTI_ADDRESS_SPACE) < 2:
        return "needs SMM: this host has no second address space (KVM_CAP_MULTI_ADDRESS_SPACE < 2, checked now)"
    return ""


def add_smram(vm: pykvm.Vm) -> None:
    """SMRAM at the default SMBASE in address space 1, with the marker-and-RSM handler at its entry."""
    vm.memory.add_slot(SMBASE, SMRAM_SIZE, address_space=1)
    vm.memory.write(SMM_ENTRY, pykvm.assemble(SMM_HANDLER, "real", origin=0).code, address_space=1)


# ---- SMI ---------------------------------------------------------------------------


def smi(control: bool = False) -> ScenarioResult:
    """KVM_SMI raises KVM_REQ_SMI: at the next entry the vCPU enters SMM and runs the handler in SMRAM."""
    t = ScenarioRecorder("SMI", control)
    if missing := smm_missing():
        return t.unreachable(missing)
    with machine() as (vm, vcpu):
        add_smram(vm)
        t.host(f"SMRAM: {SMRAM_SIZE // 1024} KiB at SMBASE {SMBASE:#x} in address space 1 (slot 1 << 16), "
               f"the handler at {SMM_ENTRY:#x}")
        code = x86.load_code(vcpu, LOOP_GUEST)
        run_until(vcpu, t, is_port(PORT_READY))
        with t.trace("kvm:kvm_smm_transition") as recording:
            if control:
                t.host("nothing (control)")
            else:
                t.host("KVM_SMI (KVM raises KVM_REQ_SMI)")
                vcpu.smi()
            pending = vcpu.events.smi.pending
            t.host(f"KVM_GET_VCPU_EVENTS: smi.pending={pending}")
            smm_at_handler = None
            handler_value = None
            for _ in range(4):
                exit = t.exit(vcpu.run())
                if io_port(exit) == PORT_HANDLER:
                    handler_value = exit.value  # type: ignore[attr-defined]
                    smm_at_handler = vcpu.events.smi.smm
                    t.guest(f"the SMM handler reports {handler_value:#x}; events smi.smm={smm_at_handler}")
                elif io_port(exit) == PORT_READY:
                    break
        smm_after = vcpu.events.smi.smm
        marker = int.from_bytes(vm.memory.read(MARKER_ADDRESS, 2, address_space=1), "little")
        saved_rip = int.from_bytes(vm.memory.read(SAVED_RIP, 8, address_space=1), "little")
        t.guest(f"SMRAM: marker {marker:#x}, saved RIP {saved_rip:#x} (the loop is at {code.address('loop'):#x}); "
                f"now smi.smm={smm_after}, the guest in its long-mode loop")
        transitions = ([bool(e["entering"]) for e in recording.named("kvm:kvm_smm_transition")]
                       if recording else None)
        t.outcome.evidence.update(
            pending_after_ioctl=pending, handler_ran=handler_value == SMM_MARKER, smm_at_handler=smm_at_handler,
            smm_after=smm_after, marker=marker, saved_rip=saved_rip, loop_rip=code.address("loop"),
            transitions=transitions)
        seen = handler_value == SMM_MARKER and smm_at_handler == 1 and smm_after == 0 and marker == SMM_MARKER
        return t.verdict(seen, "smi.pending after KVM_SMI; the SMM handler ran with smi.smm=1, wrote its marker "
                               "in SMRAM, and RSM returned to long mode")


# ---- VM_DEAD -----------------------------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def vm_dead(control: bool = False) -> ScenarioResult:
    """An SMI with no SMRAM in address space 1: enter_smm() cannot save the state and calls kvm_vm_dead()."""
    t = ScenarioRecorder("VM_DEAD", control)
    if missing := smm_missing():
        return t.unreachable(missing)
    fds_before = open_fds()
    errors: dict[str, str] = {}
    with machine() as (vm, vcpu):
        if control:
            add_smram(vm)
            t.host(f"SMRAM at {SMBASE:#x} in address space 1 (control: the SMI has somewhere to go)")
        else:
            t.host("no memory slot in address space 1: a vCPU in SMM has no memory at all")
        x86.load_code(vcpu, LOOP_GUEST)
        run_until(vcpu, t, is_port(PORT_READY))
        t.host("KVM_SMI; enter_smm() at the next entry must write the state-save area at SMBASE+0xFE00")
        vcpu.smi()
        for label, action in (("KVM_RUN", vcpu.run), ("KVM_GET_REGS", lambda: vcpu.regs),
                              ("KVM_GET_CLOCK (VM)", vm.get_clock)):
            try:
                result = action()
            except KvmError as exc:
                errors[label] = type(exc).__name__
                t.add("exit" if label == "KVM_RUN" else "host", f"{label}: {exc}")
            else:
                t.add("exit" if label == "KVM_RUN" else "host", f"{label}: {result!r}")
    fds_after = open_fds()
    t.host(f"the VM closed: {fds_before} open fds before it, {fds_after} after")
    dead = [label for label, name in errors.items() if name == KvmVmDead.__name__]
    t.outcome.evidence.update(errors=errors, dead_ioctls=dead, fds_leaked=fds_after - fds_before)
    return t.verdict(len(dead) == 3 and fds_after == fds_before,
                     "KVM_RUN, then a vCPU and a VM ioctl, all fail with EIO (KvmVmDead); closing the VM "
                     "leaves no fd behind")


REQUESTS = (
    request(
        "VM_DEAD",
        "kvm_vm_dead(): KVM_BUG_ON and unrecoverable failures, e.g. enter_smm() (smm.c) failing to write "
        "the state-save area",
        "vcpu_enter_guest(): KVM_RUN returns EIO; kvm_vcpu_ioctl()/kvm_vm_ioctl() refuse every later ioctl",
        "KVM_SMI with no memory slot in address space 1, then KVM_RUN",
        "EIO (KvmVmDead) from KVM_RUN, KVM_GET_REGS and the VM's KVM_GET_CLOCK; no fd left after close",
        "When KVM finds a VM in a state it cannot continue from (an internal bug caught by KVM_BUG_ON, or a "
        "failure half-way through a state change such as entering SMM), kvm_vm_dead() marks the VM dead and "
        "raises KVM_REQ_VM_DEAD on every vCPU, so each one leaves KVM_RUN with EIO at its next entry instead "
        "of running the guest in an undefined state; from then on kvm_main.c answers every vCPU and VM ioctl "
        "with EIO. pykvm raises KvmVmDead, whose message says the VM can only be closed. The scenario's "
        "trigger is enter_smm() finding no SMRAM to save the vCPU's state into (there is no slot in address "
        "space 1); the control gives it SMRAM, and KVM_RUN works.",
        pvm=UNREACHABLE,
        amd=OBSERVED,
        needs="SMM",
        intel=OBSERVED,
    ),
    request(
        "SMI",
        "kvm_inject_smi() from KVM_SMI (x86.c) or an SMI delivered by the LAPIC (lapic.c)",
        "process_smi() (smm.c: the SMI becomes pending), then enter_smm() from inject_pending_event() (x86.c)",
        "SMRAM in address space 1 at SMBASE 0x30000 with a handler at 0x38000, then KVM_SMI",
        "events smi.pending after the ioctl; the handler's port exit with smi.smm=1 and its marker in SMRAM; "
        "the saved RIP in the state-save area; trace kvm_smm_transition entering, then leaving at RSM",
        "A system-management interrupt puts the CPU into SMM: it saves its whole state into SMRAM (at "
        "SMBASE+0xFE00), switches to a 16-bit big-real mode with CS based at SMBASE and runs the handler at "
        "SMBASE+0x8000, in a memory view of its own (address space 1 in KVM); RSM restores the saved state. "
        "KVM_SMI and the LAPIC's SMI delivery only raise KVM_REQ_SMI: the vCPU's own thread, before its next "
        "entry, marks the SMI pending (process_smi) and injects it when SMIs are not blocked, which is when "
        "KVM writes the state-save area and switches the vCPU's registers and memory view (enter_smm, "
        "kvm_smm_transition). RSM is emulated by KVM, which reads the state back from SMRAM.",
        pvm=UNREACHABLE,
        amd=OBSERVED,
        needs="SMM",
        intel=OBSERVED,
    ),
)
SCENARIOS: dict[str, Callable[..., ScenarioResult]] = {"SMI": smi, "VM_DEAD": vm_dead}
