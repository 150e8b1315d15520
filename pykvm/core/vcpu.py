"""``Vcpu``: one virtual CPU, its shared ``kvm_run`` page, its state and its events.

Why this exists: this is where a test puts the guest into a precise state
(registers, segments, pending events), runs it (``run()`` returns a typed exit)
and injects interrupts and NMIs with the checks the KVM API leaves to the
caller (``KVM_INTERRUPT`` only when the last exit reported ready).
"""

from __future__ import annotations

import errno
import functools
import signal
import threading
from typing import TYPE_CHECKING, Iterable, Mapping

from . import exits
from .binding import ffi, lib
from .constants import Cap, MpState
from .cpuid import CpuidEntry, cpuid_from_c, cpuid_to_c
from .errors import (ClosedError, IrqchipModeError, KvmError, NotReadyForInjection,
                     StaleExitError, ioctl_error)
from .fdobject import FdObject
from .interrupts import IrqchipMode, check_vector
from .ioctls import Ioctl
from .state import Fpu, Regs, Sregs, VcpuEvents, from_c, to_c
from .stats import Stats

if TYPE_CHECKING:
    from .vm import Vm

_kvm_run = lib.pykvm_run
_thread_id = threading.get_ident
KICK_SIGNAL = signal.SIGRTMIN + 4     # real-time signal pykvm sends to kick a vCPU thread
_kick_handler_lock = threading.Lock()
_kick_handler_installed = False
_DECODERS = exits.DECODERS
_INTERRUPT_HINT = ("KVM_INTERRUPT only works with the userspace irqchip; with an in-kernel "
                   "PIC/IOAPIC use vm.irq_line() or MSI instead")


class KvmRun:
    """A checked view of the vCPU's ``struct kvm_run`` fields pykvm exposes.

    Reading or writing it after the vCPU is closed raises :class:`ClosedError`.
    """

    __slots__ = ("_vcpu",)

    def __init__(self, vcpu: "Vcpu") -> None:
        self._vcpu = vcpu

    def _run(self):
        run = self._vcpu._run
        if run is None:
            raise ClosedError("this kvm_run view belongs to a closed Vcpu")
        return run

    request_interrupt_window = property(
        lambda self: self._run().request_interrupt_window,
        lambda self, value: setattr(self._run(), "request_interrupt_window", int(bool(value))),
        doc="In: ask for KVM_EXIT_IRQ_WINDOW_OPEN as soon as the guest can take an interrupt.")
    immediate_exit = property(
        lambda self: self._run().immediate_exit,
        lambda self, value: setattr(self._run(), "immediate_exit", int(bool(value))),
        doc="In: make the next KVM_RUN return at once with EINTR (KVM_CAP_IMMEDIATE_EXIT).")
    cr8 = property(lambda self: self._run().cr8,
                   lambda self, value: setattr(self._run(), "cr8", value),
                   doc="In/out: the task-priority register (CR8).")
    ready_for_interrupt_injection = property(
        lambda self: self._run().ready_for_interrupt_injection,
        doc="Out: 1 if KVM_INTERRUPT would be taken at the next entry.")
    if_flag = property(lambda self: self._run().if_flag, doc="Out: the guest's RFLAGS.IF at the exit.")
    apic_base = property(lambda self: self._run().apic_base, doc="Out: the APIC base MSR.")
    exit_reason = property(lambda self: self._run().exit_reason, doc="Out: the raw KVM_EXIT_* value.")
    flags = property(lambda self: self._run().flags, doc="Out: KVM_RUN_X86_* flags.")

    def __repr__(self) -> str:
        if self._vcpu._run is None:
            return "<KvmRun of a closed Vcpu>"
        return (f"<KvmRun exit_reason={self.exit_reason} ready={self.ready_for_interrupt_injection} "
                f"if_flag={self.if_flag} request_interrupt_window={self.request_interrupt_window}>")


class Vcpu(FdObject):
    """A vCPU. Made by :meth:`pykvm.Vm.create_vcpu`."""

    def __init__(self, vm: "Vm", vcpu_id: int) -> None:
        fd = vm._ioctl_value(Ioctl.CREATE_VCPU, vcpu_id,
                             hint="vCPU ids must be unique and below KVM_CAP_MAX_VCPU_ID")
        super().__init__(fd)
        self.vm = vm
        self.id = vcpu_id
        self._run_size = vm.kvm.vcpu_mmap_size
        err = ffi.new("int *")
        pointer = lib.pykvm_mmap(fd, self._run_size, err)
        if pointer == ffi.NULL:
            self._run = None
            self.close()
            raise ioctl_error(err[0], "mmap", f"kvm_run of vCPU {vcpu_id}")
        self._run_pointer = pointer
        self._run = ffi.cast("struct kvm_run *", pointer)
        self._run_buffer = ffi.buffer(pointer, self._run_size)
        self._exit_sequence = 0
        self._queued: tuple[int, int] = (-1, 0)   # (exit sequence, vector) of the last KVM_INTERRUPT
        self.kvm_run = KvmRun(self)
        self.irq_controller = None   # set by pykvm.irqchip.controller.UserspaceIrqController
        self._running_thread = 0     # thread ident inside run(), 0 when none

    def describe(self) -> str:
        return f"Vcpu {self.id} of Vm (fd {self.vm._fd})"

    def _release(self) -> None:
        if "stats" in self.__dict__:
            self.stats.close()
        if self._run is not None:
            self._run = None
            self._run_buffer = None
            lib.pykvm_munmap(self._run_pointer, self._run_size)

    # -- running ------------------------------------------------------------
    def run(self) -> exits.Exit:
        """``KVM_RUN`` until the next exit to userspace; returns the typed exit."""
        run = self._run
        if run is None:
            raise ClosedError(f"Vcpu {self.id} is closed; create a new one")
        if self.irq_controller is not None:
            self.irq_controller.before_entry()
        self._exit_sequence += 1
        self._running_thread = _thread_id()
        result = _kvm_run(self._fd, run)
        self._running_thread = 0
        if result < 0:
            if result == -errno.EINTR:
                run.immediate_exit = 0     # consumed: the kick (if any) has happened
                return exits.INTR
            raise ioctl_error(-result, "KVM_RUN", self.describe(), _run_hint(-result))
        decoder = _DECODERS.get(result)
        if decoder is None:
            return exits.decode(self, run)
        return decoder(self, run)

    def _write_exit_reply(self, sequence: int, field: str, values: Mapping) -> None:
        """Write an exit's reply into kvm_run if that exit is still the current one."""
        if self._run is None:
            raise ClosedError(f"Vcpu {self.id} is closed; its exit can no longer be answered")
        if sequence != self._exit_sequence:
            raise StaleExitError("this exit was already followed by another KVM_RUN; "
                                 "answer an exit before calling run() again")
        run = self._run
        if field == "io":
            start = run.io.data_offset
            self._run_buffer[start:start + len(values["data"])] = values["data"]
        elif field == "mmio":
            run.mmio.data[0:len(values["data"])] = list(values["data"])
        else:
            for name, value in values.items():
                setattr(getattr(run, field), name, value)

    def kick(self) -> None:
        """Force ``run()`` to return an ``IntrExit`` soon, from any thread.

        Sets ``immediate_exit`` (so a ``KVM_RUN`` about to start returns at once)
        and sends :data:`KICK_SIGNAL` to the thread inside ``KVM_RUN``, if any,
        which makes KVM leave the guest with EINTR. Exactly what a VMM's
        "kick" does before injecting through the userspace path.
        """
        run = self._run
        if run is None:
            raise ClosedError(f"Vcpu {self.id} is closed; there is nothing to kick")
        self.vm.kvm.require(Cap.IMMEDIATE_EXIT, "vcpu.kick()")
        _install_kick_handler()
        run.immediate_exit = 1
        thread = self._running_thread
        if thread:
            try:
                signal.pthread_kill(thread, KICK_SIGNAL)
            except ProcessLookupError:
                pass        # the thread left run() meanwhile; immediate_exit covers its next run

    # -- injection ------------------------------------------------------------
    def interrupt(self, vector: int, force: bool = False) -> None:
        """``KVM_INTERRUPT``: queue external interrupt ``vector`` for the next entry.

        Refuses unless the last exit reported ``ready_for_interrupt_injection``
        (the guest has IF=1, no interrupt shadow, nothing else queued): KVM
        would otherwise deliver it regardless of IF on some hosts and fail the
        entry on others. ``force=True`` skips the check. A second call before
        ``run()`` is refused too, since KVM would silently replace the first.
        """
        check_vector(vector)
        run = self._run
        if run is None:
            raise ClosedError(f"Vcpu {self.id} is closed; create a new one")
        if self.vm.irqchip == IrqchipMode.KERNEL:
            self._interrupt_with_kernel_pic(vector)
        if not force:
            if self._queued[0] == self._exit_sequence:
                raise NotReadyForInjection(
                    f"vector {self._queued[1]:#x} is already queued on vCPU {self.id} for the "
                    f"next entry and KVM would silently replace it with {vector:#x}; call run() "
                    f"first, or use pykvm.irq.UserspaceIrqController to queue several")
            if not run.ready_for_interrupt_injection:
                raise NotReadyForInjection(
                    f"vCPU {self.id} is not ready for an interrupt (last exit: "
                    f"ready_for_interrupt_injection=0, if_flag={run.if_flag}): the guest has "
                    f"interrupts disabled, is in an interrupt shadow, or an event is pending. Set "
                    f"kvm_run.request_interrupt_window and inject at the next exit that reports "
                    f"ready (pykvm.irq.UserspaceIrqController does this), or pass force=True")
        self._ioctl(Ioctl.INTERRUPT, ffi.new("struct kvm_interrupt *", {"irq": vector}),
                    hint=_INTERRUPT_HINT)
        self._queued = (self._exit_sequence, vector)

    def _interrupt_with_kernel_pic(self, vector: int) -> None:
        """KVM_INTERRUPT with the in-kernel PIC: KVM answers ENXIO; say why."""
        try:
            self._ioctl(Ioctl.INTERRUPT, ffi.new("struct kvm_interrupt *", {"irq": vector}))
        except KvmError as exc:
            raise IrqchipModeError(
                f"KVM_INTERRUPT of {vector:#x} refused ({exc.strerror}): this VM has the in-kernel "
                f"PIC/IOAPIC (irqchip='kernel'), which owns external interrupts. Raise a GSI with "
                f"vm.irq_line() or an irqfd, send an MSI with vm.signal_msi(), or create the VM "
                f"with irqchip='none' (or 'split') to inject from userspace") from exc
        raise IrqchipModeError(f"KVM_INTERRUPT of {vector:#x} was accepted with the in-kernel PIC; "
                               f"this host does not follow the KVM API here")

    def nmi(self) -> None:
        """``KVM_NMI``: make an NMI pending (delivered once the guest is not blocking NMIs)."""
        self.vm.kvm.require(Cap.USER_NMI, "vcpu.nmi()")
        self._ioctl(Ioctl.NMI, hint="with an in-kernel irqchip, KVM_NMI needs the vCPU's LAPIC enabled")

    # -- LAPIC and statistics ------------------------------------------------------
    def get_lapic(self) -> bytes:
        """``KVM_GET_LAPIC``: the 1 KiB of LAPIC registers (decode with :func:`pykvm.irqchip.lapic.read`).

        Needs an in-kernel LAPIC (irqchip 'kernel' or 'split').
        """
        self.vm._require_irqchip(IrqchipMode.SPLIT, "KVM_GET_LAPIC")
        cdata = ffi.new("struct kvm_lapic_state *")
        self._ioctl(Ioctl.GET_LAPIC, cdata)
        return bytes(ffi.buffer(cdata))

    def set_lapic(self, registers: bytes) -> None:
        """``KVM_SET_LAPIC``: load 1 KiB of LAPIC registers."""
        self.vm._require_irqchip(IrqchipMode.SPLIT, "KVM_SET_LAPIC")
        cdata = ffi.new("struct kvm_lapic_state *")
        size = ffi.sizeof(cdata[0])
        if len(registers) != size:
            raise ValueError(f"set_lapic(registers=<{len(registers)} bytes>): KVM_SET_LAPIC takes "
                             f"exactly {size} bytes, the whole register page from get_lapic()")
        ffi.buffer(cdata)[:] = bytes(registers)
        self._ioctl(Ioctl.SET_LAPIC, cdata)

    @functools.cached_property
    def tsc_khz(self) -> int:
        """``KVM_GET_TSC_KHZ``: the guest TSC frequency, to turn logged TSC values into time."""
        self.vm.kvm.require(Cap.GET_TSC_KHZ, "vcpu.tsc_khz")
        return self._ioctl(Ioctl.GET_TSC_KHZ)

    @functools.cached_property
    def stats(self) -> Stats:
        """This vCPU's binary statistics: ``with vcpu.stats.delta() as d: ...; d["exits"]``."""
        return Stats.open(self)

    # -- state ----------------------------------------------------------------
    def _get(self, request: Ioctl, ctype: str, record_type):
        cdata = ffi.new(ctype)
        self._ioctl(request, cdata)
        return from_c(record_type, cdata)

    def _set(self, request: Ioctl, ctype: str, value) -> None:
        cdata = ffi.new(ctype)
        to_c(value, cdata)
        self._ioctl(request, cdata)

    @property
    def regs(self) -> Regs:
        """General-purpose registers (``KVM_GET_REGS``); assign a :class:`Regs` to set."""
        return self._get(Ioctl.GET_REGS, "struct kvm_regs *", Regs)

    @regs.setter
    def regs(self, value: Regs) -> None:
        self._set(Ioctl.SET_REGS, "struct kvm_regs *", value)

    @property
    def sregs(self) -> Sregs:
        """Segments, descriptor tables, control registers (``KVM_GET_SREGS``)."""
        return self._get(Ioctl.GET_SREGS, "struct kvm_sregs *", Sregs)

    @sregs.setter
    def sregs(self, value: Sregs) -> None:
        self._set(Ioctl.SET_SREGS, "struct kvm_sregs *", value)

    @property
    def fpu(self) -> Fpu:
        """x87/SSE state (``KVM_GET_FPU``)."""
        return self._get(Ioctl.GET_FPU, "struct kvm_fpu *", Fpu)

    @fpu.setter
    def fpu(self, value: Fpu) -> None:
        self._set(Ioctl.SET_FPU, "struct kvm_fpu *", value)

    @property
    def events(self) -> VcpuEvents:
        """Pending/injected exception, interrupt, NMI, shadow (``KVM_GET_VCPU_EVENTS``).

        Assigning applies the fields selected by ``flags`` (``KVM_VCPUEVENT_VALID_*``).
        """
        self.vm.kvm.require(Cap.VCPU_EVENTS, "vcpu.events")
        return self._get(Ioctl.GET_VCPU_EVENTS, "struct kvm_vcpu_events *", VcpuEvents)

    @events.setter
    def events(self, value: VcpuEvents) -> None:
        self.vm.kvm.require(Cap.VCPU_EVENTS, "vcpu.events")
        self._set(Ioctl.SET_VCPU_EVENTS, "struct kvm_vcpu_events *", value)

    @property
    def mp_state(self) -> MpState:
        cdata = ffi.new("struct kvm_mp_state *")
        self._ioctl(Ioctl.GET_MP_STATE, cdata)
        return MpState(cdata.mp_state)

    @mp_state.setter
    def mp_state(self, value: MpState) -> None:
        self._ioctl(Ioctl.SET_MP_STATE, ffi.new("struct kvm_mp_state *", {"mp_state": int(value)}))

    @property
    def cpuid(self) -> tuple[CpuidEntry, ...]:
        """The CPUID leaves this vCPU was given (``KVM_GET_CPUID2``)."""
        cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": lib.KVM_MAX_CPUID_ENTRIES,
                                                "entries": lib.KVM_MAX_CPUID_ENTRIES})
        self._ioctl(Ioctl.GET_CPUID2, cpuid)
        return cpuid_from_c(cpuid)

    def set_cpuid(self, entries: Iterable[CpuidEntry]) -> None:
        """``KVM_SET_CPUID2`` (before the first run)."""
        self._ioctl(Ioctl.SET_CPUID2, cpuid_to_c(entries),
                    hint="CPUID can only be set before the vCPU first runs")

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """``KVM_GET_MSRS``: the values of the given MSR indices."""
        indices = list(indices)
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": len(indices), "entries": len(indices)})
        for entry, index in zip(msrs.entries, indices):
            entry.index = index
        done = self._ioctl(Ioctl.GET_MSRS, msrs)
        if done != len(indices):
            raise ioctl_error(errno.EINVAL, "KVM_GET_MSRS", self.describe(),
                              f"MSR {indices[done]:#x} is not supported by this host")
        return {entry.index: entry.data for entry in msrs.entries[0:done]}

    def set_msrs(self, values: Mapping[int, int]) -> None:
        """``KVM_SET_MSRS``."""
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": len(values), "entries": len(values)})
        for entry, (index, value) in zip(msrs.entries, values.items()):
            entry.index, entry.data = index, value
        done = self._ioctl(Ioctl.SET_MSRS, msrs)
        if done != len(values):
            raise ioctl_error(errno.EINVAL, "KVM_SET_MSRS", self.describe(),
                              f"MSR {list(values)[done]:#x} was refused by this host")

    def set_single_step(self, enabled: bool) -> None:
        """``KVM_SET_GUEST_DEBUG`` single-step: one ``DebugExit`` per guest instruction."""
        self.vm.kvm.require(Cap.SET_GUEST_DEBUG, "single-stepping")
        control = (lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_SINGLESTEP) if enabled else 0
        self._ioctl(Ioctl.SET_GUEST_DEBUG, ffi.new("struct kvm_guest_debug *", {"control": control}))


def _run_hint(err: int) -> str:
    if err == errno.EFAULT:
        return "the guest touched memory KVM could not map (check the memory slots)"
    if err == errno.ENOEXEC:
        return "KVM found the guest state invalid"
    return ""


def _install_kick_handler() -> None:
    """Install the no-op C handler for KICK_SIGNAL once per process."""
    global _kick_handler_installed
    with _kick_handler_lock:
        if not _kick_handler_installed:
            result = lib.pykvm_install_kick_handler(KICK_SIGNAL)
            if result < 0:
                raise ioctl_error(-result, "sigaction", f"signal {KICK_SIGNAL}")
            _kick_handler_installed = True
