"""vCPU and VM state records (registers, segments, events, kvmclock, ...) as dataclasses.

Why this exists: tests build and compare state as plain Python values that
stay valid after the vCPU or VM is closed. Each record mirrors a ``struct kvm_*``
field for field (same names); one pair of generic functions copies between a
record and its C struct, so no struct has a hand-written converter. The few
records whose struct has a variable part (nested state, MSR filter ranges)
convert through cffi as well, never through hand-packed bytes.
"""

from __future__ import annotations

import dataclasses
import enum
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, overload

from . import checks
from .binding import ffi
from .constants import NESTED_SVM_VMCB_SIZE, ClockFlag, MsrFilterAccess, NestedFlag, NestedFormat
from .errors import ArgumentTypeError, InvalidArgument

T = TypeVar("T")


def _hexrepr(self) -> str:
    parts = []
    for f in dataclasses.fields(self):
        if not f.repr:
            continue
        value = getattr(self, f.name)
        if isinstance(value, enum.Enum):
            parts.append(f"{f.name}={value.name}")
        elif isinstance(value, int) and not isinstance(value, bool) and f.metadata.get("hex", True):
            parts.append(f"{f.name}={value:#x}")
        else:
            parts.append(f"{f.name}={value!r}")
    return f"{type(self).__name__}({', '.join(parts)})"


if sys.version_info >= (3, 11):
    from typing import dataclass_transform  # novermin (guarded: Python >= 3.11)
elif TYPE_CHECKING:
    from typing_extensions import dataclass_transform
else:
    def dataclass_transform(**_: Any) -> Callable[[T], T]:
        return lambda function: function


@overload
def record(cls: type[T], *, slots: bool = False) -> type[T]: ...
@overload
def record(cls: None = None, *, slots: bool = False) -> Callable[[type[T]], type[T]]: ...


@dataclass_transform()
def record(cls: type[T] | None = None, *, slots: bool = False) -> Any:
    """A mutable dataclass whose repr shows integers in hex (``@record`` or ``@record(slots=True)``)."""
    def wrap(cls: type[T]) -> type[T]:
        made = dataclasses.dataclass(cls, slots=slots, repr=False)    # repr: _hexrepr, not a generated one
        made.__repr__ = _hexrepr  # type: ignore[method-assign]
        return made
    return wrap if cls is None else wrap(cls)


@record
class Regs:
    """``struct kvm_regs``: general-purpose registers, RIP and RFLAGS."""

    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = 0x2


@record
class Segment:
    """``struct kvm_segment``: a segment register with its hidden descriptor cache."""

    base: int = 0
    limit: int = 0xFFFF
    selector: int = 0
    type: int = 0
    present: int = 1
    dpl: int = 0
    db: int = 0
    s: int = 1
    l: int = 0  # noqa: E741 (the header's name)
    g: int = 0
    avl: int = 0
    unusable: int = 0


@record
class DTable:
    """``struct kvm_dtable``: GDTR / IDTR."""

    base: int = 0
    limit: int = 0


@record
class Sregs:
    """``struct kvm_sregs``: segments, descriptor tables, control registers, EFER."""

    cs: Segment = dataclasses.field(default_factory=Segment)
    ds: Segment = dataclasses.field(default_factory=Segment)
    es: Segment = dataclasses.field(default_factory=Segment)
    fs: Segment = dataclasses.field(default_factory=Segment)
    gs: Segment = dataclasses.field(default_factory=Segment)
    ss: Segment = dataclasses.field(default_factory=Segment)
    tr: Segment = dataclasses.field(default_factory=Segment)
    ldt: Segment = dataclasses.field(default_factory=Segment)
    gdt: DTable = dataclasses.field(default_factory=DTable)
    idt: DTable = dataclasses.field(default_factory=DTable)
    cr0: int = 0
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    cr8: int = 0
    efer: int = 0
    apic_base: int = 0
    interrupt_bitmap: list = dataclasses.field(default_factory=lambda: [0] * 4)


@record
class Fpu:
    """``struct kvm_fpu`` (FXSAVE layout): x87 and SSE state."""

    fpr: list = dataclasses.field(default_factory=lambda: [bytes(16)] * 8)
    fcw: int = 0x37F
    fsw: int = 0
    ftwx: int = 0
    last_opcode: int = 0
    last_ip: int = 0
    last_dp: int = 0
    xmm: list = dataclasses.field(default_factory=lambda: [bytes(16)] * 16)
    mxcsr: int = 0x1F80


@record
class ExceptionEvent:
    """Pending or injected exception in ``struct kvm_vcpu_events``."""

    injected: int = 0
    nr: int = 0
    has_error_code: int = 0
    pending: int = 0
    error_code: int = 0


@record
class InterruptEvent:
    """Injected interrupt and interrupt shadow (``KVM_X86_SHADOW_INT_*``)."""

    injected: int = 0
    nr: int = 0
    soft: int = 0
    shadow: int = 0


@record
class NmiEvent:
    """NMI injected / pending / masked (blocked until IRET)."""

    injected: int = 0
    pending: int = 0
    masked: int = 0


@record
class SmiEvent:
    """SMM state."""

    smm: int = 0
    pending: int = 0
    smm_inside_nmi: int = 0
    latched_init: int = 0


@record
class TripleFaultEvent:
    """Pending triple fault (``KVM_CAP_X86_TRIPLE_FAULT_EVENT``)."""

    pending: int = 0


@record
class VcpuEvents:
    """``struct kvm_vcpu_events``. ``flags`` selects what ``set`` applies (``KVM_VCPUEVENT_VALID_*``)."""

    exception: ExceptionEvent = dataclasses.field(default_factory=ExceptionEvent)
    interrupt: InterruptEvent = dataclasses.field(default_factory=InterruptEvent)
    nmi: NmiEvent = dataclasses.field(default_factory=NmiEvent)
    sipi_vector: int = 0
    flags: int = 0
    smi: SmiEvent = dataclasses.field(default_factory=SmiEvent)
    triple_fault: TripleFaultEvent = dataclasses.field(default_factory=TripleFaultEvent)
    exception_has_payload: int = 0
    exception_payload: int = 0


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
        return bool(self.flags & ClockFlag.TSC_STABLE)


@dataclasses.dataclass(frozen=True)
class MsrFilterRange:
    """``struct kvm_msr_filter_range``: MSRs ``base`` + i, allowed where bit i of ``bitmap`` is 1.

    ``flags`` says which accesses the range filters (:class:`~pykvm.core.constants.MsrFilterAccess`).
    """

    flags: int
    base: int
    nmsrs: int
    bitmap: bytes

    @classmethod
    def deny(cls, index: int, flags: int = MsrFilterAccess.READ | MsrFilterAccess.WRITE) -> MsrFilterRange:
        """A range of one MSR, denied (bit 0 clear)."""
        return cls(flags, index, 1, bytes(8))

    def padded_bitmap(self) -> bytes:
        """The bitmap as KVM reads it: whole longs (BITS_TO_LONGS(nmsrs) * 8 bytes)."""
        size = (self.nmsrs + 63) // 64 * 8
        return self.bitmap[:size].ljust(size, b"\x00")


_NESTED_HEADER = ffi.sizeof("pykvm_nested_state_hdr")


@dataclasses.dataclass(frozen=True)
class NestedState:
    """``struct kvm_nested_state``: a vCPU's nested-virtualization state (``KVM_GET/SET_NESTED_STATE``).

    ``header`` is the vendor's 120-byte header (SVM: the guest-physical
    address of L1's vmcb12), ``data`` what follows the struct (SVM: vmcb12's
    control area, then at 0x400 the L1 state saved at VMRUN). With
    ``NestedFlag.GUEST_MODE`` the vCPU's registers are the L2 guest's.
    """

    flags: int
    format: int
    header: bytes = bytes(_NESTED_HEADER)
    data: bytes = b""

    @classmethod
    def svm(cls, vmcb_pa: int, vmcb12: bytes, guest_mode: bool = True, gif: bool = True) -> NestedState:
        """SVM state: in guest mode (L2 runs) under the vmcb12 at ``vmcb_pa``, whose contents are ``vmcb12``."""
        header = ffi.new("pykvm_nested_state_hdr *")
        header.svm.vmcb_pa = checks.unsigned("vmcb_pa", vmcb_pa, 64, "a guest-physical address")
        flags = (NestedFlag.GUEST_MODE if guest_mode else 0) | (NestedFlag.GIF_SET if gif else 0)
        return cls(flags, NestedFormat.SVM, ffi.buffer(header)[:],
                   bytes(vmcb12).ljust(NESTED_SVM_VMCB_SIZE, b"\x00") if guest_mode else b"")

    @property
    def guest_mode(self) -> bool:
        return bool(self.flags & NestedFlag.GUEST_MODE)

    @property
    def vmcb_pa(self) -> int:
        """SVM: the guest-physical address of vmcb12."""
        return int(ffi.from_buffer("pykvm_nested_state_hdr *", self.header).svm.vmcb_pa)

    def to_c(self) -> Any:
        """A ``struct kvm_nested_state *`` holding this state, its data right after the struct."""
        if len(self.header) != _NESTED_HEADER:
            raise InvalidArgument(f"NestedState.header: {len(self.header)} bytes, the header holds exactly "
                                  f"{_NESTED_HEADER}")
        size = ffi.sizeof("struct kvm_nested_state")
        cdata = ffi.from_buffer("struct kvm_nested_state *", bytearray(size) + bytes(self.data))
        cdata.flags, cdata.format, cdata.size = self.flags, self.format, size + len(self.data)
        ffi.buffer(ffi.addressof(cdata, "hdr"))[:] = self.header
        return cdata

    @classmethod
    def from_c(cls, cdata: Any) -> NestedState:
        """The state in a ``struct kvm_nested_state *`` whose ``size`` bytes KVM filled in."""
        return cls(cdata.flags, cdata.format, ffi.buffer(ffi.addressof(cdata, "hdr"))[:],
                   ffi.buffer(cdata, cdata.size)[ffi.sizeof(cdata[0]):])


def from_c(cls: type[T], cdata: Any) -> T:
    """Copy a C struct into a new ``cls`` record, field by field (recursively)."""
    values = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]  # records are dataclasses
        value = getattr(cdata, f.name)
        nested = _TYPES.get(f.type) if isinstance(f.type, str) else None
        if nested is not None:
            value = from_c(nested, value)
        elif not isinstance(value, int):  # a C array: of integers, or of byte rows
            value = [item if isinstance(item, int) else ffi.buffer(item)[:] for item in value]
        values[f.name] = value
    return cls(**values)


def to_c(obj: Any, cdata: Any, path: str = "") -> None:
    """Copy a record into an existing C struct, field by field (recursively).

    A field that does not fit its C type raises a typed error naming it
    (``Regs.rip=-1: ...``), never cffi's bare "can't convert negative number".
    """
    path = path or type(obj).__name__
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        name = f"{path}.{f.name}"
        if dataclasses.is_dataclass(value):
            to_c(value, getattr(cdata, f.name), name)
        elif isinstance(value, list):
            target = getattr(cdata, f.name)
            if len(value) > len(target):
                raise InvalidArgument(f"{name}: {len(value)} elements, the C array holds {len(target)}")
            for i, item in enumerate(value):
                _store(f"{name}[{i}]", target, i, item)
        else:
            _store(name, cdata, f.name, value)


def _store(name: str, target: Any, key: int | str, value: Any) -> None:
    """``target[key] = value`` (or the attribute), with cffi's conversion errors named."""
    try:
        if isinstance(value, (bytes, bytearray)) and isinstance(key, int):
            row = target[key]
            if len(value) > ffi.sizeof(row):
                raise InvalidArgument(f"{name}: {len(value)} bytes, the field holds {ffi.sizeof(row)}")
            ffi.memmove(row, bytes(value), len(value))
        elif isinstance(key, int):
            target[key] = value
        else:
            setattr(target, key, value)
    except OverflowError as exc:
        raise InvalidArgument(f"{name}={checks.shown(value)} does not fit the C field ({exc})") from None
    except TypeError as exc:
        raise ArgumentTypeError(f"{name}={checks.shown(value)}: expected an integer ({exc})") from None


_TYPES = {cls.__name__: cls for cls in (Regs, Segment, DTable, Sregs, Fpu, ExceptionEvent,
                                          InterruptEvent, NmiEvent, SmiEvent, TripleFaultEvent,
                                          VcpuEvents)}
