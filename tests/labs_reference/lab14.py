"""Lab 14 reference solution."""

from pykvm import Cap
from pykvm.core.constants import MsrFilterAccess, VcpuEventValid
from pykvm.core.state import MsrFilterRange


def _event(task):
    task.vcpu.interrupt(task.vector)               # KVM_INTERRUPT: the guest has IF=1 at its `out`


def _nmi(task):
    task.vcpu.nmi()                                # KVM_NMI


def _tlb_flush(task):
    task.vm.memory.set_dirty_logging(0, True)     # write-protect slot 0 for dirty logging
    task.vm.get_dirty_log(0)                       # KVM_GET_DIRTY_LOG: flushes every vCPU's TLB


def _triple_fault(task):
    task.vm.enable_cap(Cap.X86_TRIPLE_FAULT_EVENT, 1)
    task.vcpu.complete_pending_exit()              # finish the `out` before changing the events
    events = task.vcpu.events
    events.triple_fault.pending = 1
    events.flags = VcpuEventValid.TRIPLE_FAULT
    task.vcpu.events = events


def _msr_filter_changed(task):
    task.vm.set_msr_filter([MsrFilterRange.deny(task.msr, MsrFilterAccess.READ)])


def _clock_update(task):
    task.vm.set_clock(task.vm.get_clock().clock + 5_000_000_000)   # KVM_SET_CLOCK: 5 s later


ACTIONS = {"EVENT": _event, "NMI": _nmi, "TLB_FLUSH": _tlb_flush, "TRIPLE_FAULT": _triple_fault,
           "MSR_FILTER_CHANGED": _msr_filter_changed, "CLOCK_UPDATE": _clock_update}
EVIDENCE = {"EVENT": "irq_injections", "NMI": "nmi_injections", "TLB_FLUSH": "remote_tlb_flush_requests",
            "TRIPLE_FAULT": "KVM_EXIT_SHUTDOWN", "MSR_FILTER_CHANGED": "KVM_EXIT_X86_RDMSR",
            "CLOCK_UPDATE": "kvmclock"}


def trigger(task) -> None:
    ACTIONS[task.name](task)


def evidence(name) -> str:
    return EVIDENCE[name]
