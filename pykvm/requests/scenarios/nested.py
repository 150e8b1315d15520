"""GET_NESTED_STATE_PAGES: a nested (L2) guest restored with KVM_SET_NESTED_STATE on AMD SVM.

Why this exists: migrating a VM whose guest runs its own guest means restoring
that nested state with KVM_SET_NESTED_STATE. The ioctl may run before the
memory it refers to is ready, so KVM defers mapping those pages to the first
entry (KVM_REQ_GET_NESTED_STATE_PAGES). The scenario plays the part of an L1
hypervisor that has executed VMRUN: it writes a vmcb12 into guest memory (HLT
and VMRUN intercepted, an MSR permission map that intercepts reads of
FS_BASE), puts the L2 registers in the vCPU and hands KVM the L1 state saved
at "VMRUN". If KVM handled the request, L2 runs, its RDMSR of FS_BASE reaches
L1 as a nested #VMEXIT (only the MSR permission map merged by the request's
handler makes the CPU intercept that MSR), and L1 resumes at its own RIP. The
control loads the same registers without the nested state.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import pykvm
from pykvm import x86
from pykvm.core.constants import Cap
from pykvm.core.exits import HltExit, IoExit
from pykvm.core.state import NestedState, Segment

from .common import OBSERVED, PORT_HANDLER, UNREACHABLE, ScenarioRecorder, ScenarioResult, io_port, machine, request

NESTED_PARAMETER = Path("/sys/module/kvm_amd/parameters/nested")
VMCB12, MSRPM, IOPM = 0x30000, 0x40000, 0x44000      # vmcb12 page, 8 KiB MSR map, 12 KiB IO map (zeroed)
L1_STACK, L2_STACK = 0xE000, 0xD000
PORT_L2 = 0x12
EFER_SVME = 1 << 12
SVM_FEATURE_LEAF, SVM_FEATURE_BIT = 0x80000001, 1 << 2           # CPUID 0x80000001 ECX.SVM
INTERCEPT_HLT = 1 << 24            # control area word 3 (offset 0x0c)
INTERCEPT_MSR_PROT = 1 << 28       # word 3: MSR accesses are checked against the MSR permission map
INTERCEPT_VMRUN = 1 << 0           # control area word 4 (offset 0x10): required by the architecture
VMEXIT_MSR, VMEXIT_HLT = 0x7C, 0x78
MSR_FS_BASE = 0xC0000100
EXITCODE = 0x70                    # control area offset of EXITCODE
SAVE = 0x400                       # the save area inside the VMCB
VMCB_SEGMENT = struct.Struct("<HHIQ")   # selector, attributes, limit, base

GUEST = f"""
l1:     hlt                           # L1 runs (no IO left to complete); the host then plays its VMRUN
l1_resume:                            # where L1 continues after the nested #VMEXIT
        mov {VMCB12 + EXITCODE:#x}, %rax
        out %eax, ${PORT_HANDLER:#x}
        hlt
l2:     out %al, ${PORT_L2:#x}          # L2 runs
        mov ${MSR_FS_BASE:#x}, %ecx
        rdmsr                         # intercepted only through L1's MSR permission map
        hlt                           # intercepted by vmcb12 (HLT)
"""


def _attributes(segment: Segment) -> int:
    """A kvm_segment's descriptor bits in the VMCB's packed form (type, S, DPL, P, AVL, L, D/B, G)."""
    return (segment.type | segment.s << 4 | segment.dpl << 5 | segment.present << 7 | segment.avl << 8
            | segment.l << 9 | segment.db << 10 | segment.g << 11)


def vmcb12(sregs: pykvm.Sregs, l1_rip: int, l1_rsp: int) -> bytes:
    """A vmcb12: control area (HLT, MSR map and VMRUN intercepts, ASID 1, the map addresses) and, at 0x400, the L1
    state saved at VMRUN (``sregs`` with EFER.SVME, resuming at ``l1_rip``)."""
    page = bytearray(0x1000)
    struct.pack_into("<I", page, 0x0C, INTERCEPT_HLT | INTERCEPT_MSR_PROT)
    struct.pack_into("<I", page, 0x10, INTERCEPT_VMRUN)
    struct.pack_into("<QQ", page, 0x40, IOPM, MSRPM)
    struct.pack_into("<I", page, 0x58, 1)
    for offset, segment in ((0x00, sregs.es), (0x10, sregs.cs), (0x20, sregs.ss), (0x30, sregs.ds)):
        VMCB_SEGMENT.pack_into(page, SAVE + offset, segment.selector, _attributes(segment), segment.limit,
                               segment.base)
    VMCB_SEGMENT.pack_into(page, SAVE + 0x60, 0, 0, sregs.gdt.limit, sregs.gdt.base)
    VMCB_SEGMENT.pack_into(page, SAVE + 0x80, 0, 0, sregs.idt.limit, sregs.idt.base)
    struct.pack_into("<Q", page, SAVE + 0xD0, sregs.efer | EFER_SVME)
    struct.pack_into("<QQQQQQQ", page, SAVE + 0x148, sregs.cr4, sregs.cr3, sregs.cr0, 0x400, 0xFFFF0FF0, 0x2,
                     l1_rip)
    struct.pack_into("<Q", page, SAVE + 0x1D8, l1_rsp)
    struct.pack_into("<Q", page, SAVE + 0x1F8, VMCB12)
    return bytes(page)


def nested_svm(kvm: pykvm.Kvm) -> str:
    """Empty when this host can run an SVM guest's guest and restore its state; else what it lacks, read now."""
    if not kvm.check_extension(Cap.NESTED_STATE):
        return "this host has no KVM_CAP_NESTED_STATE"
    try:
        nested = NESTED_PARAMETER.read_text().strip()
    except OSError:
        return "this host is not kvm_amd (no /sys/module/kvm_amd/parameters/nested)"
    if nested not in ("1", "Y"):
        return f"kvm_amd nested={nested}"
    if not any(entry.function == SVM_FEATURE_LEAF and entry.ecx & SVM_FEATURE_BIT for entry in kvm.supported_cpuid):
        return "KVM offers no SVM in CPUID 0x80000001"
    return ""


def get_nested_state_pages(control: bool = False) -> ScenarioResult:
    """KVM_SET_NESTED_STATE in guest mode raises KVM_REQ_GET_NESTED_STATE_PAGES: L2 runs, its exits reach L1."""
    t = ScenarioRecorder("GET_NESTED_STATE_PAGES", control)
    with machine() as (vm, vcpu):
        lacking = nested_svm(vm.kvm)
        if lacking:
            return t.unreachable(f"needs nested SVM: {lacking} (checked now)")
        code = x86.load_code(vcpu, GUEST)
        exit = t.exit(vcpu.run())
        if not isinstance(exit, HltExit):
            raise pykvm.PyKvmError(f"L1 did not reach its hlt: {exit!r}")
        sregs = vcpu.sregs
        sregs.efer |= EFER_SVME
        vcpu.sregs = sregs
        vm.memory.write_u8(MSRPM + 0x800 + (MSR_FS_BASE & 0x1FFF) * 2 // 8, 1)   # intercept reads of FS_BASE
        regs = vcpu.regs
        regs.rip, regs.rsp, regs.rflags = code.address("l2"), L2_STACK, 0x2
        vcpu.regs = regs
        t.host(f"L1 state: EFER.SVME set; vmcb12 at {VMCB12:#x} intercepts HLT, MSR accesses through the map "
               f"(and VMRUN); MSR map at {MSRPM:#x} intercepts RDMSR {MSR_FS_BASE:#x}; vCPU registers: L2 at "
               f"{regs.rip:#x}")
        if control:
            t.host("no KVM_SET_NESTED_STATE (control): the same registers run as L1")
        else:
            page = vmcb12(sregs, code.address("l1_resume"), L1_STACK)
            vm.memory.write(VMCB12, page)
            vcpu.set_nested_state(NestedState.svm(VMCB12, page))
            t.host(f"KVM_SET_NESTED_STATE: SVM, guest mode, GIF set, vmcb_pa {VMCB12:#x}, L1 resumes at "
                   f"{code.address('l1_resume'):#x} (KVM raises KVM_REQ_GET_NESTED_STATE_PAGES)")
        guest_mode = vcpu.stats["guest_mode"] if "guest_mode" in vcpu.stats else None
        t.add("stats", f"vCPU guest_mode = {guest_mode} before the first entry")
        ports: list[int | None] = []
        with t.trace("kvm:kvm_nested_vmexit_inject", "kvm:kvm_nested_vmexit") as recording:
            for _ in range(6):
                exit = t.exit(vcpu.run())
                ports.append(io_port(exit))
                if isinstance(exit, HltExit) or io_port(exit) == PORT_HANDLER:
                    break
        l1_exit_code = exit.value if isinstance(exit, IoExit) and exit.port == PORT_HANDLER else None
        injected = [e.fields for e in recording.named("kvm:kvm_nested_vmexit_inject")] if recording else []
        t.outcome.evidence.update(guest_mode=guest_mode, l2_ran=PORT_L2 in ports, l1_exit_code=l1_exit_code,
                                  l1_resumed=l1_exit_code is not None, halted=isinstance(exit, HltExit),
                                  nested_vmexit_inject=[f.get("exit_code") for f in injected],
                                  traced=recording is not None, final_rip=vcpu.regs.rip)
        if l1_exit_code is not None:
            t.guest(f"L1 resumed at l1_resume and read EXITCODE {l1_exit_code:#x} from vmcb12"
                    + (" (VMEXIT_MSR: L2's RDMSR FS_BASE)" if l1_exit_code == VMEXIT_MSR else ""))
        seen = (guest_mode == 1 and PORT_L2 in ports and l1_exit_code == VMEXIT_MSR
                and (recording is None or VMEXIT_MSR in t.outcome.evidence["nested_vmexit_inject"]))
        if seen:
            why = ("guest_mode = 1 after the ioctl; L2 ran (its OUT), its RDMSR of FS_BASE became a nested #VMEXIT "
                   "(kvm_nested_vmexit_inject, EXITCODE 0x7c) through the MSR map merged by the request's "
                   "handler, and L1 resumed at its own RIP")
        else:
            why = (f"guest_mode {guest_mode}, L2 {'ran' if PORT_L2 in ports else 'did not run'}, L1 "
                   + (f"read EXITCODE {l1_exit_code:#x}" if l1_exit_code is not None else "did not resume")
                   + f" (expected {VMEXIT_MSR:#x}: L2's RDMSR FS_BASE through the merged MSR map)")
        return t.verdict(seen, why)


REQUESTS = (
    request(
        "GET_NESTED_STATE_PAGES",
        "svm_set_nested_state() / vmx_set_nested_state() (KVM_SET_NESTED_STATE in guest mode)",
        "vcpu_enter_guest() -> nested_ops->get_nested_state_pages(): svm_get_nested_state_pages() merges L1's "
        "MSR permission map (VMX: maps the APIC-access, virtual-APIC and posted-interrupt pages)",
        "CPUID with SVM, EFER.SVME, a vmcb12 in guest memory (HLT, MSR_PROT, VMRUN intercepted; MSR map "
        "intercepting RDMSR FS_BASE); L2 registers in the vCPU; KVM_SET_NESTED_STATE with the L1 state",
        "vCPU stat guest_mode = 1; L2's OUT; L2's RDMSR FS_BASE reaches L1 as #VMEXIT 0x7c (trace "
        "kvm_nested_vmexit_inject), L1 resumes at its own RIP",
        "KVM_SET_NESTED_STATE restores a vCPU that was running a nested guest (after migration or a "
        "snapshot). The ioctl checks and loads the state at once but cannot yet rely on guest memory being "
        "in place (userspace may restore memory afterwards), so it raises KVM_REQ_GET_NESTED_STATE_PAGES and "
        "the first entry does the part that reads guest memory: on SVM it merges L1's MSR permission map "
        "into the one the CPU uses for L2 (so MSRs that L0 would pass through still exit when L1 asked for "
        "them), on VMX it maps the pages the VMCS12 points to.",
        pvm=UNREACHABLE,
        amd=OBSERVED,
        needs="nested virtualization",
        intel=UNREACHABLE,
    ),
)
SCENARIOS: dict[str, Callable[..., ScenarioResult]] = {"GET_NESTED_STATE_PAGES": get_nested_state_pages}
