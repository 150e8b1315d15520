"""KVM ioctl request numbers, computed with ``ioctl-opt`` from the real struct sizes.

Why this exists: request numbers encode the argument size, so they are derived
here from ``ffi.sizeof`` of the structs compiled against the system header
(never typed in by hand). The unit tests compare each one with the header's
own macro as exposed by the compiled module.
"""

from __future__ import annotations

import enum

from ioctl_opt import IOC, IOC_NONE, IOC_READ, IOC_WRITE

from .binding import ffi

KVMIO = 0xAE


def _io(nr: int) -> int:
    return IOC(IOC_NONE, KVMIO, nr, 0)


def _ior(nr: int, ctype: str) -> int:
    return IOC(IOC_READ, KVMIO, nr, ffi.sizeof(ctype))


def _iow(nr: int, ctype: str) -> int:
    return IOC(IOC_WRITE, KVMIO, nr, ffi.sizeof(ctype))


def _iowr(nr: int, ctype: str) -> int:
    return IOC(IOC_READ | IOC_WRITE, KVMIO, nr, ffi.sizeof(ctype))


class Ioctl(enum.IntEnum):
    """Every KVM ioctl pykvm issues, named as in ``<linux/kvm.h>`` without ``KVM_``."""

    # /dev/kvm
    GET_API_VERSION = _io(0x00)
    CREATE_VM = _io(0x01)
    CHECK_EXTENSION = _io(0x03)
    GET_VCPU_MMAP_SIZE = _io(0x04)
    GET_SUPPORTED_CPUID = _iowr(0x05, "struct kvm_cpuid2")
    GET_SUPPORTED_HV_CPUID = _iowr(0xC1, "struct kvm_cpuid2")   # also a vCPU ioctl
    X86_GET_MCE_CAP_SUPPORTED = _ior(0x9D, "__u64")
    # VM
    CREATE_VCPU = _io(0x41)
    SET_USER_MEMORY_REGION = _iow(0x46, "struct kvm_userspace_memory_region")
    SET_TSS_ADDR = _io(0x47)
    SET_IDENTITY_MAP_ADDR = _iow(0x48, "__u64")
    ENABLE_CAP = _iow(0xA3, "struct kvm_enable_cap")
    GET_STATS_FD = _io(0xCE)
    CREATE_IRQCHIP = _io(0x60)
    IRQ_LINE = _iow(0x61, "struct kvm_irq_level")
    GET_IRQCHIP = _iowr(0x62, "struct kvm_irqchip")
    SET_IRQCHIP = _ior(0x63, "struct kvm_irqchip")   # sic: the header declares it _IOR
    IRQ_LINE_STATUS = _iowr(0x67, "struct kvm_irq_level")
    SET_GSI_ROUTING = _iow(0x6A, "struct kvm_irq_routing")
    IRQFD = _iow(0x76, "struct kvm_irqfd")
    CREATE_PIT2 = _iow(0x77, "struct kvm_pit_config")
    REINJECT_CONTROL = _io(0x71)                     # sic: _IO in the header, yet it takes a struct
    GET_PIT2 = _ior(0x9f, "struct kvm_pit_state2")
    SET_PIT2 = _iow(0xa0, "struct kvm_pit_state2")
    IOEVENTFD = _iow(0x79, "struct kvm_ioeventfd")
    SIGNAL_MSI = _iow(0xA5, "struct kvm_msi")
    SET_CLOCK = _iow(0x7B, "struct kvm_clock_data")
    GET_CLOCK = _ior(0x7C, "struct kvm_clock_data")
    X86_SET_MSR_FILTER = _iow(0xC6, "struct kvm_msr_filter")
    SET_PMU_EVENT_FILTER = _iow(0xB2, "struct kvm_pmu_event_filter")
    GET_DIRTY_LOG = _iow(0x42, "struct kvm_dirty_log")
    # vCPU
    RUN = _io(0x80)
    GET_REGS = _ior(0x81, "struct kvm_regs")
    SET_REGS = _iow(0x82, "struct kvm_regs")
    GET_SREGS = _ior(0x83, "struct kvm_sregs")
    SET_SREGS = _iow(0x84, "struct kvm_sregs")
    INTERRUPT = _iow(0x86, "struct kvm_interrupt")
    GET_MSRS = _iowr(0x88, "struct kvm_msrs")
    SET_MSRS = _iow(0x89, "struct kvm_msrs")
    GET_FPU = _ior(0x8C, "struct kvm_fpu")
    SET_SIGNAL_MASK = _iow(0x8B, "struct kvm_signal_mask")
    SET_FPU = _iow(0x8D, "struct kvm_fpu")
    GET_LAPIC = _ior(0x8E, "struct kvm_lapic_state")
    SET_LAPIC = _iow(0x8F, "struct kvm_lapic_state")
    SET_CPUID2 = _iow(0x90, "struct kvm_cpuid2")
    GET_CPUID2 = _iowr(0x91, "struct kvm_cpuid2")
    NMI = _io(0x9A)
    GET_MP_STATE = _ior(0x98, "struct kvm_mp_state")
    SET_MP_STATE = _iow(0x99, "struct kvm_mp_state")
    SET_GUEST_DEBUG = _iow(0x9B, "struct kvm_guest_debug")
    GET_TSC_KHZ = _io(0xA3)
    GET_VCPU_EVENTS = _ior(0x9F, "struct kvm_vcpu_events")
    SET_VCPU_EVENTS = _iow(0xA0, "struct kvm_vcpu_events")
    X86_SETUP_MCE = _iow(0x9C, "__u64")
    KVMCLOCK_CTRL = _io(0xAD)
    TPR_ACCESS_REPORTING = _iowr(0x92, "struct kvm_tpr_access_ctl")
    SMI = _io(0xB7)
    GET_NESTED_STATE = _iowr(0xBE, "struct kvm_nested_state")
    SET_NESTED_STATE = _iow(0xBF, "struct kvm_nested_state")

    @property
    def macro(self) -> str:
        """The header's macro name, e.g. ``KVM_RUN``."""
        return "KVM_" + self.name
