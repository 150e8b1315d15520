"""KVM's ABI constants as IntEnums.

Why this exists: readable names in exits, errors and reprs (``Cap.IRQCHIP``
rather than ``0``). The values are the kernel's stable ABI numbers; the unit
tests compare every member with the header's own macro through the compiled
binding, so a typo cannot survive.
"""

from __future__ import annotations

import enum
from typing import TypeVar


class NamedIntEnum(enum.IntEnum):
    """An IntEnum that prints as its name (``print(vcpu.mp_state)`` shows ``HALTED``, not ``3``).

    It still compares and computes as its number; ``f"{x:d}"`` or ``int(x)`` give the number.
    """

    def __str__(self) -> str:
        return self.name


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
    REINJECT_CONTROL = 24
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
    EXCEPTION_PAYLOAD = 164
    MULTI_ADDRESS_SPACE = 118
    HYPERV = 44
    HYPERV_TIME = 96
    HYPERV_SYNIC = 123
    HYPERV_SYNIC2 = 148
    HYPERV_CPUID = 167
    SYS_HYPERV_CPUID = 191
    PMU_EVENT_FILTER = 173
    PMU_CAPABILITY = 212
    MCE = 31


class ExitReason(NamedIntEnum):
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


class HypervExitType(enum.IntEnum):
    """``KVM_EXIT_HYPERV_*`` types of a HYPERV exit."""

    SYNIC = 1
    HCALL = 2
    SYNDBG = 3


class MpState(NamedIntEnum):
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


class IrqchipId(enum.IntEnum):
    """``KVM_IRQCHIP_*``: which in-kernel chip KVM_GET/SET_IRQCHIP and routing entries mean."""

    PIC_MASTER = 0
    PIC_SLAVE = 1
    IOAPIC = 2


class RoutingType(enum.IntEnum):
    """``KVM_IRQ_ROUTING_*``: the kind of a GSI routing entry."""

    IRQCHIP = 1
    MSI = 2


class IrqfdFlag(enum.IntFlag):
    """``KVM_IRQFD_FLAG_*``."""

    DEASSIGN = 1
    RESAMPLE = 2


class IoeventfdFlag(enum.IntFlag):
    """``KVM_IOEVENTFD_FLAG_*``."""

    DATAMATCH = 1
    PIO = 2
    DEASSIGN = 4


class MemoryFlag(enum.IntFlag):
    """``KVM_MEM_*``: flags of a memory slot (``KVM_SET_USER_MEMORY_REGION``)."""

    LOG_DIRTY_PAGES = 1
    READONLY = 2


class ClockFlag(enum.IntFlag):
    """``KVM_CLOCK_*``: which fields of ``struct kvm_clock_data`` KVM filled in (``KVM_GET_CLOCK``)."""

    TSC_STABLE = 2          # KVM runs the master clock: one TSC-based clock for all vCPUs
    REALTIME = 4
    HOST_TSC = 8


class MsrFilterAccess(enum.IntFlag):
    """``KVM_MSR_FILTER_READ`` / ``WRITE``: which accesses a range of ``KVM_X86_SET_MSR_FILTER`` filters."""

    READ = 1
    WRITE = 2


class MsrFilterDefault(enum.IntEnum):
    """``KVM_MSR_FILTER_DEFAULT_*``: what an MSR outside every range of the filter gets."""

    ALLOW = 0
    DENY = 1


class MsrExitReason(enum.IntFlag):
    """``KVM_MSR_EXIT_REASON_*``: why an MSR access exited to userspace (``KVM_CAP_X86_USER_SPACE_MSR``)."""

    INVAL = 1
    UNKNOWN = 2
    FILTER = 4


class VcpuEventValid(enum.IntFlag):
    """``KVM_VCPUEVENT_VALID_*``: the fields of ``struct kvm_vcpu_events`` that ``KVM_SET_VCPU_EVENTS`` applies."""

    NMI_PENDING = 0x1
    SIPI_VECTOR = 0x2
    SHADOW = 0x4
    SMM = 0x8
    PAYLOAD = 0x10
    TRIPLE_FAULT = 0x20


class PmuEventAction(enum.IntEnum):
    """``KVM_PMU_EVENT_*``: whether ``KVM_SET_PMU_EVENT_FILTER``'s events are the allowed or the denied ones."""

    ALLOW = 0
    DENY = 1


class NestedFormat(enum.IntEnum):
    """``KVM_STATE_NESTED_FORMAT_*``: the vendor layout of ``struct kvm_nested_state``."""

    VMX = 0
    SVM = 1


class NestedFlag(enum.IntFlag):
    """``KVM_STATE_NESTED_*`` flags of ``struct kvm_nested_state``."""

    GUEST_MODE = 0x1        # the vCPU's registers are the L2 guest's
    RUN_PENDING = 0x2
    EVMCS = 0x4
    MTF_PENDING = 0x8
    GIF_SET = 0x100


class StatsType(enum.IntEnum):
    """``KVM_STATS_TYPE_*`` (bits 3:0 of a stats descriptor's flags)."""

    CUMULATIVE = 0
    INSTANT = 1
    PEAK = 2
    LINEAR_HIST = 3
    LOG_HIST = 4


class StatsUnit(enum.IntEnum):
    """``KVM_STATS_UNIT_*`` (bits 7:4 of a stats descriptor's flags, shifted down)."""

    NONE = 0x00
    BYTES = 0x01
    SECONDS = 0x02
    CYCLES = 0x03
    BOOLEAN = 0x04


class StatsBase(enum.IntEnum):
    """``KVM_STATS_BASE_*`` (bits 11:8): the base of a descriptor's exponent."""

    POW10 = 0x0
    POW2 = 0x1


STATS_TYPE_SHIFT, STATS_UNIT_SHIFT, STATS_BASE_SHIFT = 0, 4, 8
IOAPIC_NUM_PINS = 24
IOAPIC_DEFAULT_BASE = 0xFEC00000    # the IOAPIC's MMIO page: index register; data register at +0x10
PIC_PINS = 16           # GSIs 0-15 reach the two 8259s as well as the IOAPIC
NESTED_SVM_VMCB_SIZE = 0x1000   # KVM_STATE_NESTED_SVM_VMCB_SIZE: the vmcb12 page in nested state's data
PMU_EVENT_FILTER_MAX_EVENTS = 300   # KVM_PMU_EVENT_FILTER_MAX_EVENTS: KVM's limit (E2BIG above), not in the UAPI


def header_macro_names() -> dict[str, int]:
    """Every member above under its header macro name (for the layout tests)."""
    prefixes: dict[type[enum.IntEnum] | type[enum.IntFlag], str] = {
        Cap: "KVM_CAP_", ExitReason: "KVM_EXIT_", InternalErrorKind: "KVM_INTERNAL_ERROR_",
        SystemEventType: "KVM_SYSTEM_EVENT_", HypervExitType: "KVM_EXIT_HYPERV_",
        MpState: "KVM_MP_STATE_", IoDirection: "KVM_EXIT_IO_",
        IrqchipId: "KVM_IRQCHIP_", RoutingType: "KVM_IRQ_ROUTING_", IrqfdFlag: "KVM_IRQFD_FLAG_",
        IoeventfdFlag: "KVM_IOEVENTFD_FLAG_", MemoryFlag: "KVM_MEM_", ClockFlag: "KVM_CLOCK_",
        MsrFilterAccess: "KVM_MSR_FILTER_", MsrFilterDefault: "KVM_MSR_FILTER_DEFAULT_",
        MsrExitReason: "KVM_MSR_EXIT_REASON_", VcpuEventValid: "KVM_VCPUEVENT_VALID_",
        PmuEventAction: "KVM_PMU_EVENT_", NestedFormat: "KVM_STATE_NESTED_FORMAT_", NestedFlag: "KVM_STATE_NESTED_"}
    names = {prefix + str(member.name): int(member)
             for enum_cls, prefix in prefixes.items() for member in enum_cls}
    # stats flags are stored shifted into their field
    for enum_cls, prefix, shift in ((StatsType, "KVM_STATS_TYPE_", STATS_TYPE_SHIFT),
                                    (StatsUnit, "KVM_STATS_UNIT_", STATS_UNIT_SHIFT),
                                    (StatsBase, "KVM_STATS_BASE_", STATS_BASE_SHIFT)):
        names.update({prefix + member.name: int(member) << shift for member in enum_cls})
        names[prefix + "SHIFT"] = shift
    names["KVM_IOAPIC_NUM_PINS"] = IOAPIC_NUM_PINS
    names["KVM_STATE_NESTED_SVM_VMCB_SIZE"] = NESTED_SVM_VMCB_SIZE
    return names


E = TypeVar("E", bound=enum.IntEnum)


def as_enum(kind: type[E], value: int) -> E | int:
    """``kind(value)`` when ``value`` is one of its members, else the plain integer.

    For fields a newer kernel (or the hardware) may fill with values this
    version of pykvm has no name for.
    """
    try:
        return kind(value)
    except ValueError:
        return value
