"""Typed results of ``Vcpu.run()``: one dataclass per ``KVM_EXIT_*`` reason.

Why this exists: a test reads ``exit.port`` and ``exit.data`` from an
``IoExit``, not offsets in ``kvm_run``. Decoding copies the payload out of the
shared page, so an exit stays valid after the vCPU runs again or is closed;
replies that must go back into ``kvm_run`` (IN data, MMIO read data, MSR and
hypercall results) are checked against the vCPU's current exit.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from . import checks
from .binding import lib
from .constants import ExitReason, HypervExitType, InternalErrorKind, IoDirection, SystemEventType, as_enum
from .errors import InvalidArgument
from .state import record

if TYPE_CHECKING:
    from .vcpu import Vcpu


@record(slots=True)
class Exit:
    """Base of every exit. ``reason`` is the ``KVM_EXIT_*`` value."""

    reason: ClassVar[ExitReason]


@record(slots=True)
class ReplyingExit(Exit):
    """An exit whose answer is written back into ``kvm_run`` before the next run."""

    vcpu: Any = dataclasses.field(repr=False, compare=False)
    sequence: int = dataclasses.field(repr=False, compare=False)

    def _reply(self, field: str, **values: Any) -> None:
        self.vcpu._write_exit_reply(self.sequence, field, values)


# The fields of a one-element IO exit that pykvm_run_guarded (csrc/pykvm_helpers.h) packs into its
# result, so that the hot path reads nothing from kvm_run: IoExit.from_packed is their one decoder.
_DIRECTION_SHIFT = lib.PYKVM_IO_DIRECTION_SHIFT
_SIZE_SHIFT = lib.PYKVM_IO_SIZE_SHIFT
_PORT_SHIFT = lib.PYKVM_IO_PORT_SHIFT
_DATA_SHIFT = lib.PYKVM_IO_DATA_SHIFT
DIRECTIONS = (IoDirection.IN, IoDirection.OUT)      # by kvm_run.io.direction
_new_tuple = tuple.__new__


class IoExit(tuple, Exit):
    """``KVM_EXIT_IO``: port IO. ``data`` holds ``size * count`` bytes (OUT: what the guest wrote).

    The commonest exit, so it is the cheapest to make: a tuple ``(port, direction,
    size, count, data, vcpu, sequence)`` with named fields, built in one step by
    one of its two decoders: :meth:`from_packed` (the result C packed for a
    one-element exit) or :meth:`from_run` (``kvm_run.io``, e.g. string IO). Like
    every exit it is a copy: valid after the next run.
    """

    __slots__ = ()
    reason: ClassVar = ExitReason.IO

    def __new__(cls, vcpu: Any, sequence: int, port: int, direction: IoDirection = IoDirection.OUT,
                size: int = 1, count: int = 1, data: bytes = b"") -> IoExit:
        return tuple.__new__(cls, (port, direction, size, count, bytes(data), vcpu, sequence))

    def __init__(self, *fields: Any, **named: Any) -> None:
        """Nothing to do: ``__new__`` set every field. (``Exit.__init__`` would refuse the arguments.)"""

    @classmethod
    def from_packed(cls, vcpu: Any, sequence: int, packed: int) -> IoExit:
        """The exit a ``KVM_RUN`` result packed by C stands for (a result above ``PYKVM_PACKED_IO``)."""
        size = packed >> _SIZE_SHIFT & 7
        return _new_tuple(cls, (packed >> _PORT_SHIFT & 0xFFFF, DIRECTIONS[packed >> _DIRECTION_SHIFT & 1], size, 1,
                                (packed >> _DATA_SHIFT & 0xFFFFFFFF).to_bytes(size, "little"), vcpu, sequence))

    @classmethod
    def from_run(cls, vcpu: Any, run: Any) -> IoExit:
        """The exit in ``run.io`` (``struct kvm_run`` of ``vcpu``), its data copied from ``vcpu``'s kvm_run page."""
        io = run.io
        start = io.data_offset
        return _new_tuple(cls, (io.port, DIRECTIONS[io.direction], io.size, io.count,
                                bytes(vcpu._run_buffer[start:start + io.size * io.count]), vcpu, vcpu._exit_sequence))

    port = property(operator.itemgetter(0), doc="The IO port.")
    direction = property(operator.itemgetter(1), doc="IoDirection.IN or OUT.")
    size = property(operator.itemgetter(2), doc="Bytes per element (1, 2 or 4).")
    count = property(operator.itemgetter(3), doc="Elements (> 1 for string IO: rep ins/outs).")
    data = property(operator.itemgetter(4), doc="size * count bytes (OUT: written by the guest).")
    vcpu = property(operator.itemgetter(5), doc="The Vcpu whose run() returned this exit.")
    sequence = property(operator.itemgetter(6), doc="Which exit of that vCPU this is (1, 2, ...); reply() "
                                                     "refuses once a later run() has begun.")

    @property
    def is_out(self) -> bool:
        """True for OUT (the guest wrote ``data``), False for IN (the guest waits for ``reply()``)."""
        return self[1] == IoDirection.OUT

    @property
    def value(self) -> int:
        """The first element as a little-endian integer."""
        return int.from_bytes(self[4][:self[2]], "little")

    def reply(self, data: bytes | int) -> None:
        """Answer an IN: bytes, or an integer sent as ``size``-byte little-endian elements."""
        if self.is_out:
            raise InvalidArgument(f"reply() answers an IN; this exit is an OUT to port {self.port:#x}")
        if isinstance(data, int) and not isinstance(data, bool):
            checks.unsigned("data", data, 8 * self.size)
            data = data.to_bytes(self.size, "little") * self.count
        data = checks.data("data", data)
        if len(data) != self.size * self.count:
            raise InvalidArgument(f"data: an IN of {self.count} x {self.size} bytes needs "
                                  f"{self.size * self.count} bytes, got {len(data)}")
        self.vcpu._write_exit_reply(self.sequence, "io", {"data": data})

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IoExit) and self[:5] == other[:5] and self[6] == other[6]

    def __hash__(self) -> int:
        return hash(self[:5])

    def __repr__(self) -> str:
        return (f"IoExit(port={self.port:#x}, direction={self.direction.name}, size={self.size}, "
                f"count={self.count}, data={self.data!r})")

    def __reduce__(self) -> Any:
        raise TypeError("an IoExit refers to its vCPU and cannot be pickled")


@record(slots=True)
class MmioExit(ReplyingExit):
    """``KVM_EXIT_MMIO``: an access to guest-physical memory no slot backs."""

    reason: ClassVar = ExitReason.MMIO
    phys_addr: int = 0
    length: int = 0
    is_write: bool = False
    data: bytes = b""

    def reply(self, data: bytes | int) -> None:
        """Answer an MMIO read with ``length`` bytes (or an integer, little-endian)."""
        if self.is_write:
            raise InvalidArgument(f"reply() answers an MMIO read; this exit is a write to {self.phys_addr:#x}, "
                                  f"which needs no reply: just run the vCPU again")
        if isinstance(data, int) and not isinstance(data, bool):
            data = checks.unsigned("data", data, 8 * self.length,
                                   f"the guest reads {self.length} byte(s)").to_bytes(self.length, "little")
        data = checks.data("data", data)
        if len(data) != self.length:
            raise InvalidArgument(f"data=<{len(data)} bytes>: this MMIO read of {self.phys_addr:#x} takes exactly "
                                  f"{self.length} byte(s); pass that many, or an integer")
        self._reply("mmio", data=data)


@record(slots=True)
class HltExit(Exit):
    """``KVM_EXIT_HLT``: the guest executed HLT (userspace irqchip)."""

    reason: ClassVar = ExitReason.HLT


@record(slots=True)
class IrqWindowOpenExit(Exit):
    """``KVM_EXIT_IRQ_WINDOW_OPEN``: the guest can take an interrupt now (requested window)."""

    reason: ClassVar = ExitReason.IRQ_WINDOW_OPEN


@record(slots=True)
class ShutdownExit(Exit):
    """``KVM_EXIT_SHUTDOWN``: triple fault (or another shutdown condition)."""

    reason: ClassVar = ExitReason.SHUTDOWN


@record(slots=True)
class IntrExit(Exit):
    """``KVM_EXIT_INTR`` or ``KVM_RUN`` returning EINTR: a signal or ``immediate_exit`` kicked the vCPU."""

    reason: ClassVar = ExitReason.INTR


@record(slots=True)
class FailEntryExit(Exit):
    """``KVM_EXIT_FAIL_ENTRY``: the hardware refused to enter the guest.

    ``explanation`` is filled in by an :data:`ExitExplainer` (``pykvm.hosts.explain_exit``), not by the core.
    """

    reason: ClassVar = ExitReason.FAIL_ENTRY
    hardware_entry_failure_reason: int = 0
    cpu: int = 0
    explanation: str = dataclasses.field(default="", metadata={"hex": False})


@record(slots=True)
class InternalErrorExit(Exit):
    """``KVM_EXIT_INTERNAL_ERROR``: KVM itself could not go on (e.g. emulation failure).

    ``insn_bytes`` are the instruction bytes KVM reported (emulation failures).
    The rest is not in ``kvm_run`` and is filled in by an :data:`ExitExplainer`
    (``pykvm.hosts.explain_exit``, which guest sessions and the VMM are given),
    not by the core, which issues no ioctl to decode an exit: ``rip`` (read with
    ``KVM_GET_REGS``, 0 until then), ``insn_bytes`` fetched from guest memory
    at that RIP when KVM reported none, ``explanation`` (what is known about it
    on this host) and ``host_limit`` (True when it is a documented limit of this
    host's KVM rather than a guest bug).
    """

    reason: ClassVar = ExitReason.INTERNAL_ERROR
    suberror: InternalErrorKind | int = 0
    data: tuple = ()
    rip: int = 0
    insn_bytes: bytes = b""
    explanation: str = dataclasses.field(default="", metadata={"hex": False})
    host_limit: bool = False


@record(slots=True)
class DebugExit(Exit):
    """``KVM_EXIT_DEBUG``: single step, breakpoint or watchpoint (``KVM_SET_GUEST_DEBUG``)."""

    reason: ClassVar = ExitReason.DEBUG
    exception: int = 0
    pc: int = 0
    dr6: int = 0
    dr7: int = 0


@record(slots=True)
class SystemEventExit(Exit):
    """``KVM_EXIT_SYSTEM_EVENT``: shutdown, reset, crash, ... requested by the guest."""

    reason: ClassVar = ExitReason.SYSTEM_EVENT
    type: SystemEventType | int = 0
    data: tuple = ()


@record(slots=True)
class MsrExit(ReplyingExit):
    """``KVM_EXIT_X86_RDMSR`` / ``WRMSR`` (``KVM_CAP_X86_USER_SPACE_MSR``)."""

    is_write: bool = False
    index: int = 0
    data: int = 0
    msr_reason: int = 0

    @property
    def reason(self) -> ExitReason:  # type: ignore[override]  # one class for both MSR exits
        return ExitReason.X86_WRMSR if self.is_write else ExitReason.X86_RDMSR

    def reply(self, data: int = 0, error: bool = False) -> None:
        """Give RDMSR its value, or make the access #GP with ``error=True``."""
        checks.unsigned("data", data, 64, "an MSR value")
        self._reply("msr", data=data, error=int(error))


@record(slots=True)
class HypercallExit(ReplyingExit):
    """``KVM_EXIT_HYPERCALL`` (``KVM_CAP_EXIT_HYPERCALL``)."""

    reason: ClassVar = ExitReason.HYPERCALL
    nr: int = 0
    args: tuple = ()
    longmode: int = 0

    def reply(self, ret: int) -> None:
        """The value the guest's hypercall returns in RAX."""
        checks.integer("ret", ret, -(1 << 63), (1 << 64) - 1, "the hypercall's 64-bit return value (RAX), "
                       "signed or unsigned")
        self._reply("hypercall", ret=ret & ((1 << 64) - 1))


@record(slots=True)
class ExceptionExit(Exit):
    """``KVM_EXIT_EXCEPTION``: an exception KVM hands to userspace."""

    reason: ClassVar = ExitReason.EXCEPTION
    exception: int = 0
    error_code: int = 0


@record(slots=True)
class TprAccessExit(Exit):
    """``KVM_EXIT_TPR_ACCESS``: the guest read or wrote the xAPIC TPR (``tpr_access_reporting``)."""

    reason: ClassVar = ExitReason.TPR_ACCESS
    rip: int = 0
    is_write: bool = False


@record(slots=True)
class IoapicEoiExit(Exit):
    """``KVM_EXIT_IOAPIC_EOI``: the guest EOI'd a level-triggered vector of the userspace IOAPIC (split irqchip)."""

    reason: ClassVar = ExitReason.IOAPIC_EOI
    vector: int = 0


@record(slots=True)
class HypervExit(Exit):
    """``KVM_EXIT_HYPERV``: Hyper-V emulation needs userspace (``vcpu.enable_cap(Cap.HYPERV_SYNIC)``).

    ``struct kvm_hyperv_exit``, its union's member for ``type`` copied out:
    ``SYNIC``: the guest wrote the SynIC MSR ``msr`` (SCONTROL, SIEFP or SIMP),
    and ``control``, ``evt_page``, ``msg_page`` are the SynIC's registers after
    the write; ``HCALL``: ``input``, ``result``, ``params``; ``SYNDBG``: ``msr``,
    ``control``, ``status``, ``send_page``, ``recv_page``, ``pending_page``.
    Fields of the other types stay 0.
    """

    reason: ClassVar = ExitReason.HYPERV
    type: HypervExitType | int = 0
    msr: int = 0
    control: int = 0
    evt_page: int = 0
    msg_page: int = 0
    input: int = 0
    result: int = 0
    params: tuple = ()
    status: int = 0
    send_page: int = 0
    recv_page: int = 0
    pending_page: int = 0


@record(slots=True)
class UnknownExit(Exit):
    """Any exit pykvm has no type for; ``exit_reason`` is the raw number."""

    reason: ClassVar = ExitReason.UNKNOWN
    exit_reason: int = 0
    hardware_exit_reason: int = 0


# ---- decoding from struct kvm_run (called by Vcpu.run) --------------------------

def _mmio(vcpu, run) -> MmioExit:
    mmio = run.mmio
    length = mmio.len
    return MmioExit(vcpu, vcpu._exit_sequence, mmio.phys_addr, length, bool(mmio.is_write),
                    bytes(mmio.data[0:length]))


#: ``explain(vcpu, exit)`` fills in ``explanation`` (and ``host_limit``) of a FAIL_ENTRY or
#: INTERNAL_ERROR exit. What such an exit means on a given host is known a layer up
#: (:func:`pykvm.hosts.limits.explain_exit`); code that reports these exits (a guest session,
#: the VMM) is given one by the layer that owns it and calls it. The core only decodes.
ExitExplainer = Callable[["Vcpu", Exit], None]


def _fail_entry(vcpu, run) -> Exit:
    fail = run.fail_entry
    return FailEntryExit(fail.hardware_entry_failure_reason, fail.cpu)


def _internal(vcpu, run) -> Exit:
    internal = run.internal
    data = tuple(internal.data[0:min(internal.ndata, 16)])
    insn = b""
    if internal.suberror == InternalErrorKind.EMULATION:
        failure = run.emulation_failure
        if failure.ndata >= 2 and failure.flags & 1:
            insn = bytes(failure.insn_bytes[0:failure.insn_size])
    return InternalErrorExit(as_enum(InternalErrorKind, internal.suberror), data, 0, insn)


def _debug(vcpu, run) -> DebugExit:
    arch = run.debug.arch
    return DebugExit(arch.exception, arch.pc, arch.dr6, arch.dr7)


def _system_event(vcpu, run) -> SystemEventExit:
    event = run.system_event
    return SystemEventExit(as_enum(SystemEventType, event.type), tuple(event.data[0:min(event.ndata, 16)]))


def _msr(vcpu, run) -> MsrExit:
    msr = run.msr
    return MsrExit(vcpu, vcpu._exit_sequence, run.exit_reason == ExitReason.X86_WRMSR,
                   msr.index, msr.data, msr.reason)


def _hypercall(vcpu, run) -> HypercallExit:
    call = run.hypercall
    return HypercallExit(vcpu, vcpu._exit_sequence, call.nr, tuple(call.args), call.longmode)


def _exception(vcpu, run) -> ExceptionExit:
    return ExceptionExit(run.ex.exception, run.ex.error_code)


def _tpr_access(vcpu, run) -> TprAccessExit:
    access = run.tpr_access
    return TprAccessExit(access.rip, bool(access.is_write))


def _ioapic_eoi(vcpu, run) -> IoapicEoiExit:
    return IoapicEoiExit(run.eoi.vector)


# The member of kvm_hyperv_exit's union each type fills in, and its fields HypervExit copies.
_HYPERV_FIELDS: dict[int, tuple[str, tuple[str, ...]]] = {
    HypervExitType.SYNIC: ("synic", ("msr", "control", "evt_page", "msg_page")),
    HypervExitType.HCALL: ("hcall", ("input", "result", "params")),
    HypervExitType.SYNDBG: ("syndbg", ("msr", "control", "status", "send_page", "recv_page", "pending_page"))}


def _hyperv(vcpu, run) -> HypervExit:
    hyperv = run.hyperv
    member, names = _HYPERV_FIELDS.get(hyperv.type, ("", ()))
    fields: dict[str, Any] = {}
    for name in names:
        value = getattr(getattr(hyperv.u, member), name)
        fields[name] = value if isinstance(value, int) else tuple(value)
    return HypervExit(as_enum(HypervExitType, hyperv.type), **fields)


_HLT = HltExit()
_WINDOW = IrqWindowOpenExit()
_SHUTDOWN = ShutdownExit()
INTR = IntrExit()

DECODERS: dict[int, Callable[[Any, Any], Exit]] = {
    ExitReason.IO: IoExit.from_run,
    ExitReason.MMIO: _mmio,
    ExitReason.HLT: lambda vcpu, run: _HLT,
    ExitReason.IRQ_WINDOW_OPEN: lambda vcpu, run: _WINDOW,
    ExitReason.SHUTDOWN: lambda vcpu, run: _SHUTDOWN,
    ExitReason.INTR: lambda vcpu, run: INTR,
    ExitReason.FAIL_ENTRY: _fail_entry,
    ExitReason.INTERNAL_ERROR: _internal,
    ExitReason.DEBUG: _debug,
    ExitReason.SYSTEM_EVENT: _system_event,
    ExitReason.X86_RDMSR: _msr,
    ExitReason.X86_WRMSR: _msr,
    ExitReason.HYPERCALL: _hypercall,
    ExitReason.EXCEPTION: _exception,
    ExitReason.TPR_ACCESS: _tpr_access,
    ExitReason.IOAPIC_EOI: _ioapic_eoi,
    ExitReason.HYPERV: _hyperv,
}


def decode(vcpu, run) -> Exit:
    """The typed exit for the reason in ``run`` (``UnknownExit`` if pykvm has none)."""
    decoder = DECODERS.get(run.exit_reason)
    if decoder is None:
        return UnknownExit(run.exit_reason, run.hw.hardware_exit_reason)
    return decoder(vcpu, run)
