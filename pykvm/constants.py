"""KVM's ABI constants as IntEnums.

Why this exists: readable names in exits, errors and reprs (``Cap.IRQCHIP``
rather than ``0``). The values are the kernel's stable ABI numbers; the unit
tests compare every member with the header's own macro through the compiled
binding, so a typo cannot survive.
"""

from __future__ import annotations

import enum


class Cap(enum.IntEnum):
    """``KVM_CAP_*`` numbers for :meth:`pykvm.Kvm.check_extension`."""

    IRQCHIP = 0
    HLT = 1
    USER_MEMORY = 3
    SET_TSS_ADDR = 4
    EXT_CPUID = 7
    NR_VCPUS = 9
    NR_MEMSLOTS = 10
    PIT = 11
    NOP_IO_DELAY = 12
    SYNC_MMU = 16
    IOMMU = 18
    USER_NMI = 22
    SET_GUEST_DEBUG = 23
    IRQ_ROUTING = 25
    IRQ_INJECT_STATUS = 26
    SET_IDENTITY_MAP_ADDR = 37
    IRQFD = 32
    PIT2 = 33
    SET_BOOT_CPU_ID = 34
    IOEVENTFD = 36
    ADJUST_CLOCK = 39
    VCPU_EVENTS = 41
    PCI_SEGMENT = 47
    INTR_SHADOW = 49
    DEBUGREGS = 50
    XSAVE = 55
    XCRS = 56
    TSC_CONTROL = 60
    GET_TSC_KHZ = 61
    SIGNAL_MSI = 77
    TSC_DEADLINE_TIMER = 72
    MAX_VCPUS = 66
    IRQFD_RESAMPLE = 82
    READONLY_MEM = 81
    IMMEDIATE_EXIT = 136
    X86_SMM = 117
    SPLIT_IRQCHIP = 121
    X2APIC_API = 129
    NESTED_STATE = 157
    X86_USER_SPACE_MSR = 188
    X86_MSR_FILTER = 189
    EXIT_HYPERCALL = 201
    EXIT_ON_EMULATION_FAILURE = 204
    SYNC_REGS = 74
    BINARY_STATS_FD = 203
    X86_TRIPLE_FAULT_EVENT = 218
    INTERNAL_ERROR_DATA = 40
    DIRTY_LOG_RING = 192
    MAX_VCPU_ID = 128


class ExitReason(enum.IntEnum):
    """``KVM_EXIT_*``: why ``KVM_RUN`` returned."""

    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    SET_TPR = 11
    TPR_ACCESS = 12
    NMI = 16
    INTERNAL_ERROR = 17
    SYSTEM_EVENT = 24
    IOAPIC_EOI = 26
    HYPERV = 27
    X86_RDMSR = 29
    X86_WRMSR = 30
    DIRTY_RING_FULL = 31
    X86_BUS_LOCK = 33
    NOTIFY = 37


class InternalErrorKind(enum.IntEnum):
    """``KVM_INTERNAL_ERROR_*`` suberrors of an INTERNAL_ERROR exit."""

    EMULATION = 1
    SIMUL_EX = 2
    DELIVERY_EV = 3
    UNEXPECTED_EXIT_REASON = 4


class SystemEventType(enum.IntEnum):
    """``KVM_SYSTEM_EVENT_*`` types of a SYSTEM_EVENT exit."""

    SHUTDOWN = 1
    RESET = 2
    CRASH = 3
    WAKEUP = 4
    SUSPEND = 5
    SEV_TERM = 6


class MpState(enum.IntEnum):
    """``KVM_MP_STATE_*`` of a vCPU."""

    RUNNABLE = 0
    UNINITIALIZED = 1
    INIT_RECEIVED = 2
    HALTED = 3
    SIPI_RECEIVED = 4
    STOPPED = 5
    CHECK_STOP = 6
    OPERATING = 7
    LOAD = 8
    AP_RESET_HOLD = 9
    SUSPENDED = 10


class IoDirection(enum.IntEnum):
    """``KVM_EXIT_IO_IN`` / ``KVM_EXIT_IO_OUT``."""

    IN = 0
    OUT = 1


def header_macro_names() -> dict[str, int]:
    """Every member above under its header macro name (for the layout tests)."""
    prefixes = {Cap: "KVM_CAP_", ExitReason: "KVM_EXIT_", InternalErrorKind: "KVM_INTERNAL_ERROR_",
                SystemEventType: "KVM_SYSTEM_EVENT_", MpState: "KVM_MP_STATE_",
                IoDirection: "KVM_EXIT_IO_"}
    return {prefix + member.name: int(member)
            for enum_cls, prefix in prefixes.items() for member in enum_cls}
