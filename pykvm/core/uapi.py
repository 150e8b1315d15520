"""KVM ioctls beyond the compiled binding's declarations: struct layouts packed with ``struct``.

Why this exists: the clock, MSR-filter, dirty-log, TPR-reporting and
kvmclock-control ioctls each take a small fixed struct of ``<linux/kvm.h>``
(x86-64 ABI, stable). They are packed here with :mod:`struct` and passed to
the same C ``ioctl`` helper as every other request, so adding one needs no
rebuild of the binding. The request numbers are computed from these layouts'
sizes with ``ioctl-opt``; ``tests/test_requests.py`` compiles the header's own
macros with the C compiler and compares them.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from typing import Any

from ioctl_opt import IOC, IOC_NONE, IOC_READ, IOC_WRITE

from .binding import ffi, lib
from .errors import ioctl_error

KVMIO = 0xAE

# struct kvm_clock_data { u64 clock; u32 flags; u32 pad0; u64 realtime; u64 host_tsc; u32 pad[4]; }
CLOCK_DATA = struct.Struct("<QII QQ 16x")
# struct kvm_msr_filter_range { u32 flags; u32 nmsrs; u32 base; u8 *bitmap; }  (pointer 8-aligned)
MSR_FILTER_RANGE = struct.Struct("<III4xQ")
MSR_FILTER_MAX_RANGES = 16
# struct kvm_msr_filter { u32 flags; struct kvm_msr_filter_range ranges[16]; }
MSR_FILTER_SIZE = 8 + MSR_FILTER_MAX_RANGES * MSR_FILTER_RANGE.size
# struct kvm_dirty_log { u32 slot; u32 padding1; union { void *dirty_bitmap; u64 padding2; }; }
DIRTY_LOG = struct.Struct("<I4xQ")
# struct kvm_tpr_access_ctl { u32 enabled; u32 flags; u32 reserved[8]; }
TPR_ACCESS_CTL = struct.Struct("<II32x")
# kvm_run's exit union: tpr_access { u64 rip; u32 is_write; u32 pad; }, eoi { u8 vector; }
RUN_TPR_ACCESS = struct.Struct("<QI")
RUN_EOI = struct.Struct("<B")
# struct kvm_pmu_event_filter { u32 action; u32 nevents; u32 fixed_counter_bitmap; u32 flags; u32 pad[4];
#                               u64 events[]; }
PMU_EVENT_FILTER = struct.Struct("<IIII16x")
# struct kvm_nested_state { u16 flags; u16 format; u32 size; union { vmx; svm { u64 vmcb_pa; }; u8 pad[120]; } hdr;
#                           u8 data[]; }  (data: for SVM the 4096-byte vmcb12, control area then save area at 0x400)
NESTED_STATE = struct.Struct("<HHI120s")
# kvm_run's exit union: hyperv { u32 type; u32 pad; union { synic { u32 msr; u32 pad; u64 control, evt_page,
# msg_page; }, hcall, syndbg } }: the type, then the union as the 6 u64 words of its largest member (syndbg)
RUN_HYPERV = struct.Struct("<I4x6Q")

# Flags and values of the header, named as there without KVM_.
CLOCK_TSC_STABLE = 2
CLOCK_REALTIME = 1 << 2
CLOCK_HOST_TSC = 1 << 3
MEM_LOG_DIRTY_PAGES = 1 << 0
MSR_FILTER_READ = 1 << 0
MSR_FILTER_WRITE = 1 << 1
MSR_FILTER_DEFAULT_ALLOW = 0
MSR_FILTER_DEFAULT_DENY = 1
MSR_EXIT_REASON_INVAL = 1 << 0
MSR_EXIT_REASON_UNKNOWN = 1 << 1
MSR_EXIT_REASON_FILTER = 1 << 2
VCPUEVENT_VALID_NMI_PENDING = 0x1
VCPUEVENT_VALID_SMM = 0x8
VCPUEVENT_VALID_TRIPLE_FAULT = 0x20
TPR_ACCESS_REPORTING_ENABLED = 1
PMU_EVENT_ALLOW = 0
PMU_EVENT_DENY = 1
PMU_EVENT_FILTER_MAX_EVENTS = 300     # KVM's limit (E2BIG above it); not in the UAPI header
NESTED_FORMAT_VMX, NESTED_FORMAT_SVM = 0, 1
NESTED_GUEST_MODE, NESTED_RUN_PENDING, NESTED_GIF_SET = 0x1, 0x2, 0x100
NESTED_SVM_VMCB_SIZE = 0x1000


class UapiIoctl(enum.IntEnum):
    """Request numbers of the ioctls packed in this module, named as in the header without ``KVM_``."""

    SET_CLOCK = IOC(IOC_WRITE, KVMIO, 0x7B, CLOCK_DATA.size)
    GET_CLOCK = IOC(IOC_READ, KVMIO, 0x7C, CLOCK_DATA.size)
    KVMCLOCK_CTRL = IOC(IOC_NONE, KVMIO, 0xAD, 0)
    X86_SET_MSR_FILTER = IOC(IOC_WRITE, KVMIO, 0xC6, MSR_FILTER_SIZE)
    GET_DIRTY_LOG = IOC(IOC_WRITE, KVMIO, 0x42, DIRTY_LOG.size)
    TPR_ACCESS_REPORTING = IOC(IOC_READ | IOC_WRITE, KVMIO, 0x92, TPR_ACCESS_CTL.size)
    SMI = IOC(IOC_NONE, KVMIO, 0xB7, 0)
    SET_PMU_EVENT_FILTER = IOC(IOC_WRITE, KVMIO, 0xB2, PMU_EVENT_FILTER.size)
    GET_NESTED_STATE = IOC(IOC_READ | IOC_WRITE, KVMIO, 0xBE, NESTED_STATE.size)
    SET_NESTED_STATE = IOC(IOC_WRITE, KVMIO, 0xBF, NESTED_STATE.size)

    @property
    def macro(self) -> str:
        return "KVM_" + self.name


@dataclasses.dataclass(frozen=True)
class ClockData:
    """``struct kvm_clock_data``: the VM's kvmclock in ns, with ``realtime`` / ``host_tsc`` where flagged."""

    clock: int
    flags: int = 0
    realtime: int = 0
    host_tsc: int = 0

    @property
    def tsc_stable(self) -> bool:
        """``KVM_CLOCK_TSC_STABLE``: KVM runs the master clock (one TSC-based clock for all vCPUs)."""
        return bool(self.flags & CLOCK_TSC_STABLE)

    def pack(self) -> bytes:
        return CLOCK_DATA.pack(self.clock, self.flags, 0, self.realtime, self.host_tsc)

    @classmethod
    def unpack(cls, raw: bytes) -> ClockData:
        clock, flags, _, realtime, host_tsc = CLOCK_DATA.unpack(raw)
        return cls(clock, flags, realtime, host_tsc)


@dataclasses.dataclass(frozen=True)
class MsrFilterRange:
    """One range of ``KVM_X86_SET_MSR_FILTER``: MSRs ``base`` + i, allowed where bit i of ``bitmap`` is 1.

    ``flags`` says which accesses the range filters (``MSR_FILTER_READ`` and/or ``MSR_FILTER_WRITE``).
    """

    flags: int
    base: int
    nmsrs: int
    bitmap: bytes

    @classmethod
    def deny(cls, index: int, flags: int = MSR_FILTER_READ | MSR_FILTER_WRITE) -> MsrFilterRange:
        """A range of one MSR, denied (bit 0 clear)."""
        return cls(flags, index, 1, bytes(8))

    def padded_bitmap(self) -> bytes:
        """The bitmap as KVM reads it: whole longs (BITS_TO_LONGS(nmsrs) * 8 bytes)."""
        size = (self.nmsrs + 63) // 64 * 8
        return self.bitmap[:size].ljust(size, b"\x00")


@dataclasses.dataclass(frozen=True)
class NestedState:
    """``struct kvm_nested_state``: a vCPU's nested-virtualization state (``KVM_GET/SET_NESTED_STATE``).

    ``header`` is the vendor's 120-byte header (SVM: the guest-physical
    address of L1's vmcb12), ``data`` what follows it (SVM: vmcb12's control
    area, then at 0x400 the L1 state saved at VMRUN). With ``NESTED_GUEST_MODE``
    the vCPU's registers are the L2 guest's.
    """

    flags: int
    format: int
    header: bytes = bytes(120)
    data: bytes = b""

    @classmethod
    def svm(cls, vmcb_pa: int, vmcb12: bytes, guest_mode: bool = True, gif: bool = True) -> NestedState:
        """SVM state: in guest mode (L2 runs) under the vmcb12 at ``vmcb_pa``, whose contents are ``vmcb12``."""
        flags = (NESTED_GUEST_MODE if guest_mode else 0) | (NESTED_GIF_SET if gif else 0)
        return cls(flags, NESTED_FORMAT_SVM, vmcb_pa.to_bytes(8, "little").ljust(120, b"\x00"),
                   bytes(vmcb12).ljust(NESTED_SVM_VMCB_SIZE, b"\x00") if guest_mode else b"")

    @property
    def guest_mode(self) -> bool:
        return bool(self.flags & NESTED_GUEST_MODE)

    @property
    def vmcb_pa(self) -> int:
        """SVM: the guest-physical address of vmcb12."""
        return int.from_bytes(self.header[:8], "little")

    def pack(self) -> bytes:
        return NESTED_STATE.pack(self.flags, self.format, NESTED_STATE.size + len(self.data), self.header) + self.data

    @classmethod
    def unpack(cls, raw: bytes) -> NestedState:
        flags, format, size, header = NESTED_STATE.unpack_from(raw)
        return cls(flags, format, header, bytes(raw[NESTED_STATE.size:size]))


def call(owner: Any, request: UapiIoctl, arg: bytes | bytearray | int | None = None, hint: str = "") -> int:
    """Issue ``request`` on ``owner``'s fd (a Vm or Vcpu) with a packed struct (copied back in place
    for a ``bytearray``), an integer, or nothing; a typed :class:`~pykvm.core.errors.KvmError` on failure."""
    owner._check_open()
    if isinstance(arg, int):
        result = lib.pykvm_ioctl_value(owner._fd, request, arg)
    else:
        if arg is None:
            buffer = ffi.NULL
        elif isinstance(arg, bytearray):
            buffer = ffi.from_buffer(arg)        # KVM's answer lands in the bytearray itself
        else:
            buffer = ffi.new("char[]", bytes(arg))
        result = lib.pykvm_ioctl(owner._fd, request, buffer)
    if result < 0:
        raise ioctl_error(-result, request.macro, owner.describe(), hint)
    return result
