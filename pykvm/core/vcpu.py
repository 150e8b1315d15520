"""``Vcpu``: one virtual CPU, its shared ``kvm_run`` page, its state and its events.

Why this exists: this is where a test puts the guest into a precise state
(registers, segments, pending events), runs it (``run()`` returns a typed exit)
and issues the vCPU's ioctls, one method each (``interrupt()`` is
``KVM_INTERRUPT``, ``events`` is ``KVM_GET/SET_VCPU_EVENTS``). The rules the
KVM API leaves to the caller around them (inject only when the last exit
reported ready, finish a pending exit before setting an event) are
:mod:`pykvm.injection`'s.
"""

from __future__ import annotations

import errno
import functools
import signal
import threading
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from . import checks, exits
from .binding import ffi, lib
from .constants import Cap, ExitReason, IoDirection, MpState, as_enum
from .cpuid import CpuidEntry, cpuid_from_c, cpuid_to_c
from .errors import (
    ClosedError,
    InvalidArgument,
    IrqchipModeError,
    KvmBusy,
    KvmError,
    NotReadyForInjection,
    StaleExitError,
    VcpuBusyError,
    VcpuThreadError,
    ioctl_error,
)
from .fdobject import FdObject
from .interrupts import IrqchipMode, check_vector
from .ioctls import Ioctl
from .state import Fpu, NestedState, Regs, Sregs, VcpuEvents, from_c, to_c

if TYPE_CHECKING:
    from .stats import Stats
    from .vm import Vm

_thread_id = threading.get_ident
CLOSE_GRACE = 2.0                     # seconds close() waits for another thread to leave KVM_RUN
_EXIT_IO = int(ExitReason.IO)
_io_exit = exits.IoExit.from_packed
_run_guarded = lib.pykvm_run_guarded
_guard_acquire = lib.pykvm_guard_acquire
_guard_release = lib.pykvm_guard_release
_guard_close = lib.pykvm_guard_close
_guard_thread = lib.pykvm_guard_thread
_guard_kick = lib.pykvm_guard_kick
_GUARD_BUSY = lib.PYKVM_GUARD_BUSY          # -100000: taken by another thread
_GUARD_CLOSED = lib.PYKVM_GUARD_CLOSED      # -100001: the vCPU is closed
_PACKED_IO = lib.PYKVM_PACKED_IO            # results above it are packed IO exits
_HELD_BY_US = _PACKED_IO                    # run()'s marker: guard taken, KVM_RUN not yet returned
KICK_SIGNAL = signal.SIGRTMIN + 4     # real-time signal pykvm sends to kick a vCPU thread
_kick_handler_lock = threading.Lock()
_kick_handler_installed = False
_DECODERS = exits.DECODERS
# Exits whose instruction KVM finishes only at the next KVM_RUN (api.rst, "struct kvm_run":
# the operation is complete, and guest state consistent, only after re-entering KVM_RUN).
_UNFINISHED = frozenset({ExitReason.IO, ExitReason.MMIO, ExitReason.X86_RDMSR, ExitReason.X86_WRMSR,
                         ExitReason.HYPERCALL})
_NO_EXIT = -1                 # _last_result before the first KVM_RUN
_MSR_VALUE_NOTES = {
    0xC0000080: "IA32_EFER has SCE 0, LME 8, LMA 10, NXE 11, SVME 12, LMSLE 13, FFXSR 14, TCE 15 and AutoIBRS 21, "
                "each only with its CPUID feature; the other bits are reserved",
}


class EntryHook(Protocol):
    """What ``run()`` calls before every ``KVM_RUN`` when attached as ``vcpu.irq_controller``."""

    def before_entry(self) -> None: ...


class KvmRun:
    """A checked view of the vCPU's ``struct kvm_run`` fields pykvm exposes.

    Reading or writing it after the vCPU is closed raises :class:`ClosedError`.
    """

    __slots__ = ("_vcpu",)

    def __init__(self, vcpu: Vcpu) -> None:
        self._vcpu = vcpu

    def _run(self):
        run = self._vcpu._run
        if run is None:
            raise ClosedError("this kvm_run view belongs to a closed Vcpu")
        return run

    def _set_cr8(self, value: int) -> None:
        checks.integer("cr8", value, 0, 15, "the task priority, 0..15")
        with self._vcpu._map_lock:
            self._run().cr8 = value

    request_interrupt_window = property(
        lambda self: self._run().request_interrupt_window,
        lambda self, value: setattr(self._run(), "request_interrupt_window", int(bool(value))),
        doc="In: ask for KVM_EXIT_IRQ_WINDOW_OPEN as soon as the guest can take an interrupt.")
    immediate_exit = property(
        lambda self: self._run().immediate_exit,
        lambda self, value: setattr(self._run(), "immediate_exit", int(bool(value))),
        doc="In: make the next KVM_RUN return at once with EINTR (KVM_CAP_IMMEDIATE_EXIT).")
    cr8 = property(lambda self: self._run().cr8, _set_cr8,
                   doc="In/out: the task-priority register (CR8).")
    ready_for_interrupt_injection = property(
        lambda self: self._run().ready_for_interrupt_injection,
        doc="Out: 1 if KVM_INTERRUPT would be taken at the next entry.")
    if_flag = property(lambda self: self._run().if_flag, doc="Out: the guest's RFLAGS.IF at the exit.")
    apic_base = property(lambda self: self._run().apic_base, doc="Out: the APIC base MSR.")
    exit_reason = property(lambda self: as_enum(ExitReason, self._run().exit_reason),
                           doc="Out: the last exit's KVM_EXIT_* value, an ExitReason (printed by name) if "
                               "pykvm knows it, else the number.")
    flags = property(lambda self: self._run().flags, doc="Out: KVM_RUN_X86_* flags.")

    def __repr__(self) -> str:
        if self._vcpu._run is None:
            return "<KvmRun of a closed Vcpu>"
        return (f"<KvmRun exit_reason={self.exit_reason} ready={self.ready_for_interrupt_injection} "
                f"if_flag={self.if_flag} request_interrupt_window={self.request_interrupt_window}>")


class Vcpu(FdObject):
    """A vCPU. Made by :meth:`pykvm.Vm.create_vcpu`."""

    def __init__(self, vm: Vm, vcpu_id: int) -> None:
        self._run: Any = None          # kvm_run, once mapped (_release reads it)
        fd = vm._ioctl_value(Ioctl.CREATE_VCPU, vcpu_id,
                             hint="vCPU ids must be unique and below KVM_CAP_MAX_VCPU_ID")
        super().__init__(fd)
        self.vm = vm
        self.id = vcpu_id
        # The run guard (C, atomic): held by the thread inside run(), from KVM_RUN until its
        # exit is read, and it names that thread for kicks. _map_lock: held by short accesses
        # to kvm_run from any thread. close() takes both, after kicking a running thread out
        # of KVM_RUN, before it unmaps kvm_run.
        self._guard = ffi.new("struct pykvm_vcpu_guard *")
        self._map_lock = threading.RLock()
        self._run_size = vm.kvm.vcpu_mmap_size
        # Read now: a kick is a signal to a thread and must work with the Kvm closed.
        self._immediate_exit = bool(vm.kvm.check_extension(Cap.IMMEDIATE_EXIT))
        err = ffi.new("int *")
        pointer = lib.pykvm_mmap(fd, self._run_size, err)
        if pointer == ffi.NULL:
            self.close()
            raise ioctl_error(err[0], "mmap", f"kvm_run of vCPU {vcpu_id}")
        self._run_pointer = pointer
        self._run = ffi.cast("struct kvm_run *", pointer)
        self._run_c = self._run        # what C is given: never read once the guard says closed
        self._run_fd = fd              # likewise: close() closes the guard before the fd
        self._run_buffer = ffi.buffer(pointer, self._run_size)
        self._exit_sequence = 0
        self.kvm_run = KvmRun(self)
        self.irq_controller: EntryHook | None = None   # e.g. pykvm.irqchip.UserspaceIrqController
        self._last_result = _NO_EXIT  # what the last KVM_RUN returned: an exit reason or -errno
        self._replied = -1           # exit sequence of the last reply written into kvm_run

    def describe(self) -> str:
        return f"Vcpu {self.id} of Vm (fd {self.vm._fd})"

    @property
    def exit_sequence(self) -> int:
        """How many times ``KVM_RUN`` has returned on this vCPU: the ``sequence`` of its last exit (0 before any).

        ``run()`` and ``complete_pending_exit()`` each add one. Code that acts
        "before the next entry" (e.g. :class:`pykvm.injection.Injector`, which
        remembers the interrupt it queued) compares it with the value it saw.

        Example::

            import pykvm
            from pykvm import x86
            with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
                vcpu = vm.create_vcpu()
                x86.load_code(vcpu, "1: hlt\\njmp 1b", mode="real")
                assert vcpu.exit_sequence == 0
                vcpu.run(), vcpu.run()
                assert vcpu.exit_sequence == 2
        """
        return self._exit_sequence

    def _release(self) -> None:
        if "stats" in self.__dict__:
            self.stats.close()
        if self._run is None:
            return
        if not self._close_guard():
            # A thread is still inside KVM_RUN: never unmap kvm_run under it (that is a
            # SIGSEGV). The page is left mapped; that thread's next run() raises ClosedError.
            raise VcpuThreadError(f"Vcpu {self.id} was closed while another thread stayed inside "
                                  f"KVM_RUN for {CLOSE_GRACE:g} s after kicks; its kvm_run page is "
                                  f"left mapped")
        with self._map_lock:
            self._run = None
            self._run_buffer = None
            lib.pykvm_munmap(self._run_pointer, self._run_size)

    def _close_guard(self) -> bool:
        """Close the run guard, kicking a thread in KVM_RUN out first; False if it never left."""
        guard = self._guard
        deadline = time.monotonic() + CLOSE_GRACE
        next_kick = 0.0
        while not _guard_close(guard):
            now = time.monotonic()
            if now > deadline:
                return False
            if now >= next_kick:              # again now and then: it may have been between runs
                self._kick_out()
                next_kick = now + 0.05
            time.sleep(0.0005)
        return True

    def _kick_out(self) -> None:
        """Make a KVM_RUN in progress on another thread return (no capability check)."""
        with self._map_lock:
            if self._run is not None:
                self._run.immediate_exit = 1
        if _guard_thread(self._guard) != _thread_id():
            try:
                self._signal_runner()
            except KvmBusy:         # a full signal queue: close() kicks again until its grace ends
                pass

    def _signal_runner(self) -> None:
        """Send KICK_SIGNAL to the thread inside KVM_RUN, unless none is or this run was sent one.

        One signal per run (``pykvm_guard_kick`` in csrc/pykvm_helpers.h): a real-time
        signal takes an entry of the user's pending-signal queue, bounded by
        RLIMIT_SIGPENDING for all the user's processes, and one per kick filled it in a
        storm (EAGAIN). Only a queue other processes keep full for a whole second still fails.
        """
        install_kick_handler()
        result = _guard_kick(self._guard, KICK_SIGNAL)
        if result < 0:
            raise ioctl_error(-result, "tgkill", f"the thread running {self.describe()}",
                              "this user's queue of pending signals stayed full (RLIMIT_SIGPENDING, "
                              "`ulimit -i`): other processes hold queued signals; raise the limit"
                              if result == -errno.EAGAIN else "")

    # -- running ------------------------------------------------------------
    def run(self) -> exits.Exit:
        """``KVM_RUN`` until the next exit to userspace; returns the typed exit.

        One thread at a time: a second thread calling ``run()`` meanwhile gets
        :class:`VcpuBusyError`. ``close()`` from another thread kicks this one out
        of ``KVM_RUN`` and waits for it; the next ``run()`` raises :class:`ClosedError`.

        Example::

            import pykvm
            from pykvm import IoExit, x86
            with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
                vcpu = vm.create_vcpu()
                x86.load_code(vcpu, "mov $0x42, %al\\nout %al, $0x80", mode="real")
                exit = vcpu.run()
                assert isinstance(exit, IoExit) and (exit.port, exit.data) == (0x80, b"\\x42")
        """
        guard = self._guard
        result = -1
        try:
            if self.irq_controller is None:
                result = _run_guarded(self._run_fd, self._run_c, guard, 0)
            else:
                self._hold()
                result = _HELD_BY_US     # until KVM_RUN returns: the hook may raise
                self.irq_controller.before_entry()
                result = _run_guarded(self._run_fd, self._run_c, guard, 1)
            if result > _PACKED_IO:      # the hot path: a one-element IO exit packed by C, guard released
                sequence = self._exit_sequence = self._exit_sequence + 1
                self._last_result = _EXIT_IO
                return _io_exit(self, sequence, result)
            if result <= _GUARD_BUSY:    # the guard was not taken
                raise self._busy() if result == _GUARD_BUSY else self._closed()
            self._exit_sequence += 1
            return self._decode(result)
        finally:
            # Ours to give back only for a plain exit (C gave it back for the rest): even when
            # an exception (Ctrl-C) arrives between any two of the lines above.
            if 0 <= result < _PACKED_IO or result == _HELD_BY_US:
                _guard_release(guard)

    def _hold(self) -> None:
        """Take the run guard (for work on kvm_run that must not race a run or a close)."""
        result = _guard_acquire(self._guard)
        if result:
            raise self._busy() if result == _GUARD_BUSY else self._closed()

    def _busy(self) -> VcpuBusyError:
        return VcpuBusyError(f"Vcpu {self.id} is already running on another thread (thread id "
                             f"{_guard_thread(self._guard) or 'entering'}); one thread drives a vCPU: "
                             f"call run() only from that thread, and kick() it from others")

    def _closed(self) -> ClosedError:
        if self.vm.closed:
            return ClosedError(f"Vcpu {self.id} was closed with its Vm (vm.close() closes its vCPUs); create a new "
                               f"Vm and Vcpu (objects cannot be reopened)")
        return ClosedError(f"Vcpu {self.id} is closed; create a new one (objects cannot be reopened)")

    def _decode(self, result: int) -> exits.Exit:
        """The typed exit for a KVM_RUN result (with the guard held unless ``result`` is packed)."""
        if result > _PACKED_IO:          # from complete_pending_exit(); run() decodes its own (hot path)
            self._last_result = _EXIT_IO
            return _io_exit(self, self._exit_sequence, result)
        self._last_result = result
        run = self._run_c
        if result < 0:
            if result == -errno.EINTR:     # C has cleared immediate_exit: the kick is consumed
                return exits.INTR
            raise ioctl_error(-result, "KVM_RUN", self.describe(), _run_hint(-result, self.vm))
        decoder = _DECODERS.get(result)
        if decoder is None:
            return exits.decode(self, run)
        return decoder(self, run)

    def _write_exit_reply(self, sequence: int, field: str, values: Mapping) -> None:
        """Write an exit's reply into kvm_run if that exit is still the current one."""
        with self._map_lock:
            if self._run is None:
                raise ClosedError(f"Vcpu {self.id} is closed; its exit can no longer be answered")
            if sequence != self._exit_sequence:
                raise StaleExitError("this exit was already followed by another KVM_RUN; "
                                     "answer an exit before calling run() again")
            self._write_reply(self._run, field, values)
            self._replied = sequence

    def _write_reply(self, run, field: str, values: Mapping) -> None:
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
        "kick" does before injecting through the userspace path. It needs
        neither the :class:`~pykvm.Kvm` open nor room in the signal queue: a
        storm of kicks sends one signal per ``KVM_RUN``.

        Example::

            import pykvm
            from pykvm import IntrExit, x86
            with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
                vcpu = vm.create_vcpu()
                x86.load_code(vcpu, "hlt", mode="real")
                vcpu.kick()                          # no thread in KVM_RUN: the next one returns at once
                assert isinstance(vcpu.run(), IntrExit)
                assert vcpu.regs.rip == 0            # the guest did not run
        """
        if not self._immediate_exit:
            self.vm.kvm.require(Cap.IMMEDIATE_EXIT, "vcpu.kick()")
        with self._map_lock:
            run = self._run
            if run is None:
                raise ClosedError(f"Vcpu {self.id} is closed; there is nothing to kick")
            run.immediate_exit = 1
        self._signal_runner()

    def complete_pending_exit(self) -> exits.Exit | None:
        """``KVM_RUN`` with ``immediate_exit`` set: KVM finishes the last exit's instruction, runs no further.

        After ``KVM_EXIT_IO``, ``KVM_EXIT_MMIO``, an MSR or a hypercall exit, KVM
        finishes the instruction (stores an IN's data, steps RIP past it) only
        at the next ``KVM_RUN``; until then guest state is not consistent and no
        event should be set (api.rst, ``struct kvm_run``). This is that
        ``KVM_RUN``, made with ``kvm_run.immediate_exit = 1``: KVM completes
        the instruction, then returns EINTR before entering the guest. (Some
        hosts report RIP already past an OUT at its exit, kvm_pvm among them:
        the doctor's ``io_exit_rip`` row. The completion is needed all the same.)

        Returns None when the last exit needs no completion (nothing is run),
        else what the ``KVM_RUN`` returned: the ``IntrExit`` once the
        instruction is finished, or a new exit when it needs another round trip
        (the next element of a string IO, the second half of a split MMIO
        access): answer that one and call again. The reply to an IN, an MMIO
        read, RDMSR or a hypercall must already be written (``exit.reply()``),
        since KVM reads it now: without one this raises
        :class:`NotReadyForInjection`. A :meth:`kick` pending for the next
        ``run()`` stays pending; the irq controller's hook does not run.

        It is one ioctl, so it belongs to the binding: the ``KVM_RUN`` has to be
        made under the vCPU's run guard with ``immediate_exit`` saved and
        restored, which only the core can do safely beside ``run()``,
        ``kick()`` and ``close()`` on other threads. When to call it (before
        setting an event) is the caller's rule: :meth:`pykvm.injection.Injector.exception`
        calls it.

        Example::

            import pykvm
            from pykvm import IntrExit, IoExit, x86
            with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
                vcpu = vm.create_vcpu()
                x86.load_code(vcpu, "out %al, $0x80\\nhlt", mode="real")
                assert isinstance(vcpu.run(), IoExit)
                assert isinstance(vcpu.complete_pending_exit(), IntrExit)
                assert vcpu.regs.rip == 2            # past the 2-byte OUT, and not one instruction further
        """
        run = self._run
        if run is None:
            raise self._closed()
        reason = self._last_result
        if reason not in _UNFINISHED:
            return None
        if self._replied != self._exit_sequence and _needs_reply(run, reason):
            raise NotReadyForInjection(
                f"vCPU {self.id}'s last exit ({ExitReason(reason).name}) is a read that has not been "
                f"answered; KVM would complete it with whatever kvm_run holds. Call the exit's "
                f"reply() first, then complete_pending_exit()")
        self.vm.kvm.require(Cap.IMMEDIATE_EXIT, "vcpu.complete_pending_exit()")
        self._hold()
        released = False              # C gives the guard back with a packed IO exit or an error
        try:
            kicked = run.immediate_exit
            run.immediate_exit = 1
            try:
                result = _run_guarded(self._run_fd, self._run_c, self._guard, 1)
                released = result > _PACKED_IO or result < 0
                self._exit_sequence += 1
                return self._decode(result)
            finally:
                with self._map_lock:
                    if self._run is not None:
                        self._run.immediate_exit = kicked
        finally:
            if not released:
                _guard_release(self._guard)

    # -- injection ------------------------------------------------------------
    def interrupt(self, vector: int) -> None:
        """``KVM_INTERRUPT``: queue external interrupt ``vector`` for the next entry (userspace irqchip).

        The bare ioctl. KVM takes it whatever the guest's state: the API asks
        the caller to inject only after an exit that reported
        ``kvm_run.ready_for_interrupt_injection``, and a second call before
        ``run()`` replaces the first. :class:`pykvm.injection.Injector` follows
        those rules; this method is for code that follows them itself or breaks
        them on purpose (KVM then delivers the vector regardless of IF on
        kvm_amd and kvm_pvm, and the VM entry fails on kvm_intel). With the
        in-kernel PIC (``irqchip='kernel'``) KVM refuses it (ENXIO):
        :class:`IrqchipModeError` names the paths that VM has.

        Example::

            import pykvm
            with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
                vcpu = vm.create_vcpu()
                vcpu.interrupt(0x40)
                assert (vcpu.events.interrupt.injected, vcpu.events.interrupt.nr) == (1, 0x40)
        """
        check_vector(vector)
        if self._run is None:
            raise self._closed()
        try:
            self._ioctl(Ioctl.INTERRUPT, ffi.new("struct kvm_interrupt *", {"irq": vector}))
        except KvmError as exc:
            if self.vm.irqchip != IrqchipMode.KERNEL:
                raise
            raise IrqchipModeError(
                f"KVM_INTERRUPT of {vector:#x} refused ({exc.strerror}): this VM has the in-kernel "
                f"PIC/IOAPIC (irqchip='kernel'), which owns external interrupts. Raise a GSI with "
                f"vm.irq_line() or an irqfd, send an MSI with vm.signal_msi(), or create the VM "
                f"with irqchip='none' (or 'split') to inject from userspace") from exc

    def nmi(self) -> None:
        """``KVM_NMI``: make an NMI pending (delivered once the guest is not blocking NMIs).

        Example::

            import pykvm
            with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
                vcpu = vm.create_vcpu()
                vcpu.nmi()
                assert vcpu.events.nmi.pending == 1
        """
        self.vm.kvm.require(Cap.USER_NMI, "vcpu.nmi()")
        self._ioctl(Ioctl.NMI, hint="with an in-kernel irqchip, KVM_NMI needs the vCPU's LAPIC enabled")

    # -- LAPIC and statistics ------------------------------------------------------
    def get_lapic(self) -> bytes:
        """``KVM_GET_LAPIC``: the 1 KiB of LAPIC registers (decode with :func:`pykvm.irqchip.lapic.read`).

        Needs an in-kernel LAPIC (irqchip 'kernel' or 'split').

        Example::

            import pykvm
            from pykvm.irqchip import lapic
            with pykvm.Kvm() as kvm, kvm.create_vm(irqchip="split") as vm:
                vm.create_vcpu()
                registers = vm.create_vcpu().get_lapic()
                assert lapic.read_register(registers, lapic.ApicReg.ID) >> 24 == 1   # vCPU 1's APIC ID
        """
        self.vm._require_irqchip(IrqchipMode.SPLIT, "KVM_GET_LAPIC")
        cdata = ffi.new("struct kvm_lapic_state *")
        self._ioctl(Ioctl.GET_LAPIC, cdata)
        return bytes(ffi.buffer(cdata))

    def set_lapic(self, registers: bytes) -> None:
        """``KVM_SET_LAPIC``: load 1 KiB of LAPIC registers.

        Example::

            import pykvm
            from pykvm.irqchip import lapic
            with pykvm.Kvm() as kvm, kvm.create_vm(irqchip="split") as vm:
                vcpu = vm.create_vcpu()
                vcpu.set_lapic(lapic.with_register(vcpu.get_lapic(), lapic.ApicReg.TPR, 0x20))
                assert lapic.read(vcpu).tpr == 0x20
        """
        self.vm._require_irqchip(IrqchipMode.SPLIT, "KVM_SET_LAPIC")
        cdata = ffi.new("struct kvm_lapic_state *")
        size = ffi.sizeof(cdata[0])
        if len(registers) != size:
            raise InvalidArgument(f"set_lapic(registers=<{len(registers)} bytes>): KVM_SET_LAPIC takes "
                             f"exactly {size} bytes, the whole register page from get_lapic()")
        ffi.buffer(cdata)[:] = bytes(registers)
        self._ioctl(Ioctl.SET_LAPIC, cdata)

    @functools.cached_property
    def tsc_khz(self) -> int:
        """``KVM_GET_TSC_KHZ``: the guest TSC frequency, to turn logged TSC values into time.

        Example::

            import pykvm
            from pykvm import Cap
            with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
                if kvm.check_extension(Cap.GET_TSC_KHZ):
                    assert vm.create_vcpu().tsc_khz > 100_000    # over 100 MHz
        """
        self.vm.kvm.require(Cap.GET_TSC_KHZ, "vcpu.tsc_khz")
        return self._ioctl(Ioctl.GET_TSC_KHZ)

    @functools.cached_property
    def stats(self) -> Stats:
        """``KVM_GET_STATS_FD``: this vCPU's statistics (a :class:`~pykvm.core.stats.Stats`, opened on first use).

        Example::

            import pykvm
            from pykvm import x86
            with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
                vcpu = vm.create_vcpu()
                x86.load_code(vcpu, "out %al, $0x80", mode="real")
                with vcpu.stats.delta("exits") as delta:
                    vcpu.run()
                assert delta["exits"] >= 1
        """
        from .stats import Stats  # here: a vCPU that never reads its statistics skips the import

        return Stats.open(self)

    # -- state ----------------------------------------------------------------
    def _get(self, request: Ioctl, ctype: str, record_type):
        cdata = ffi.new(ctype)
        self._ioctl(request, cdata)
        return from_c(record_type, cdata)

    def _set(self, request: Ioctl, ctype: str, value: object, hint: str = "") -> None:
        cdata = ffi.new(ctype)
        to_c(value, cdata)
        self._ioctl(request, cdata, hint=hint)

    @property
    def regs(self) -> Regs:
        """``KVM_GET_REGS`` / ``KVM_SET_REGS``: the general-purpose registers, RIP and RFLAGS.

        Reading returns a :class:`Regs`; assigning one loads all of them.

        Example::

            import pykvm
            with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
                vcpu = vm.create_vcpu()
                assert vcpu.regs.rip == 0xFFF0       # the x86 reset vector
                regs = vcpu.regs
                regs.rip, regs.rax = 0x1000, 42
                vcpu.regs = regs
                assert (vcpu.regs.rip, vcpu.regs.rax) == (0x1000, 42)
        """
        return self._get(Ioctl.GET_REGS, "struct kvm_regs *", Regs)

    @regs.setter
    def regs(self, value: Regs) -> None:
        checks.instance("regs", value, Regs, "assign a pykvm.Regs (e.g. vcpu.regs with fields changed)")
        self._set(Ioctl.SET_REGS, "struct kvm_regs *", value)

    @property
    def sregs(self) -> Sregs:
        """``KVM_GET_SREGS`` / ``KVM_SET_SREGS``: segments, descriptor tables, control registers, EFER.

        Assigning an :class:`Sregs` loads them; KVM checks them for consistency (EINVAL).

        Example::

            import pykvm
            with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
                vcpu = vm.create_vcpu()
                sregs = vcpu.sregs
                assert (sregs.cs.selector, sregs.cs.base) == (0xF000, 0xFFFF0000)   # reset state
                sregs.ds.base = 0x2000
                vcpu.sregs = sregs
                assert vcpu.sregs.ds.base == 0x2000
        """
        return self._get(Ioctl.GET_SREGS, "struct kvm_sregs *", Sregs)

    @sregs.setter
    def sregs(self, value: Sregs) -> None:
        checks.instance("sregs", value, Sregs, "assign a pykvm.Sregs (e.g. vcpu.sregs with fields changed)")
        self._set(Ioctl.SET_SREGS, "struct kvm_sregs *", value,
                  hint="KVM found these segment/control registers inconsistent (e.g. CR0.PG without "
                       "CR0.PE, EFER.LME without long-mode CPUID, a bad CS type); pykvm.x86.enter_*_mode "
                       "sets consistent ones")

    @property
    def fpu(self) -> Fpu:
        """``KVM_GET_FPU`` / ``KVM_SET_FPU``: the x87 and SSE registers (FXSAVE layout).

        KVM copies ``mxcsr`` in neither direction (upstream's get/set_fpu leave it
        out): it reads 0, and a value assigned is not loaded.

        Example::

            import pykvm
            with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
                vcpu = vm.create_vcpu()
                fpu = vcpu.fpu
                assert fpu.fcw == 0x37F              # the x87 control word FNINIT sets
                fpu.fcw = 0x27F                      # round to double precision
                vcpu.fpu = fpu
                assert vcpu.fpu.fcw == 0x27F
        """
        return self._get(Ioctl.GET_FPU, "struct kvm_fpu *", Fpu)

    @fpu.setter
    def fpu(self, value: Fpu) -> None:
        checks.instance("fpu", value, Fpu)
        self._set(Ioctl.SET_FPU, "struct kvm_fpu *", value)

    @property
    def events(self) -> VcpuEvents:
        """``KVM_GET_VCPU_EVENTS`` / ``KVM_SET_VCPU_EVENTS``: pending/injected exception, interrupt, NMI, shadow.

        Assigning applies the fields selected by ``flags`` (``KVM_VCPUEVENT_VALID_*``).

        Example::

            import pykvm
            from pykvm.core.constants import VcpuEventValid
            with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
                vcpu = vm.create_vcpu()
                events = vcpu.events
                events.nmi.pending, events.flags = 1, VcpuEventValid.NMI_PENDING
                vcpu.events = events
                assert vcpu.events.nmi.pending == 1
        """
        self.vm.kvm.require(Cap.VCPU_EVENTS, "vcpu.events")
        return self._get(Ioctl.GET_VCPU_EVENTS, "struct kvm_vcpu_events *", VcpuEvents)

    @events.setter
    def events(self, value: VcpuEvents) -> None:
        checks.instance("events", value, VcpuEvents, "assign a pykvm.VcpuEvents (e.g. vcpu.events changed)")
        self.vm.kvm.require(Cap.VCPU_EVENTS, "vcpu.events")
        self._set(Ioctl.SET_VCPU_EVENTS, "struct kvm_vcpu_events *", value,
                  hint="KVM refused the events: unknown bits in flags, a vector above 31 for an "
                       "exception, or a pending and an injected exception at once; to inject an "
                       "exception use pykvm.injection.Injector(vcpu).exception()")

    @property
    def mp_state(self) -> MpState:
        """``KVM_GET_MP_STATE`` / ``KVM_SET_MP_STATE``: the vCPU's multiprocessor state.

        With an in-kernel LAPIC KVM creates the first vCPU RUNNABLE and the others
        UNINITIALIZED (waiting for INIT and SIPI); the other states need that LAPIC.

        Example::

            import pykvm
            from pykvm import MpState
            with pykvm.Kvm() as kvm, kvm.create_vm(irqchip="kernel") as vm:
                bsp, ap = vm.create_vcpu(), vm.create_vcpu()
                assert (bsp.mp_state, ap.mp_state) == (MpState.RUNNABLE, MpState.UNINITIALIZED)
                ap.mp_state = MpState.INIT_RECEIVED
                assert ap.mp_state == MpState.INIT_RECEIVED
        """
        cdata = ffi.new("struct kvm_mp_state *")
        self._ioctl(Ioctl.GET_MP_STATE, cdata)
        return MpState(cdata.mp_state)

    @mp_state.setter
    def mp_state(self, value: MpState) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value not in set(MpState):
            raise InvalidArgument(f"mp_state={checks.shown(value)}: choose a pykvm.MpState member "
                                  f"({', '.join(m.name for m in MpState)})")
        self._ioctl(Ioctl.SET_MP_STATE, ffi.new("struct kvm_mp_state *", {"mp_state": int(value)}),
                    hint="this state needs an in-kernel LAPIC (INIT_RECEIVED, SIPI_RECEIVED, HALTED) "
                         "or is not offered by this host")

    @property
    def cpuid(self) -> tuple[CpuidEntry, ...]:
        """``KVM_GET_CPUID2``: the CPUID leaves this vCPU was given (by ``KVM_SET_CPUID2``).

        Example::

            import pykvm
            with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
                vcpu = vm.create_vcpu()
                functions = {entry.function for entry in vcpu.cpuid}
                assert functions == {entry.function for entry in kvm.supported_cpuid}
        """
        cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": lib.KVM_MAX_CPUID_ENTRIES,
                                                "entries": lib.KVM_MAX_CPUID_ENTRIES})
        self._ioctl(Ioctl.GET_CPUID2, cpuid)
        return cpuid_from_c(cpuid)

    def set_cpuid(self, entries: Iterable[CpuidEntry]) -> None:
        """``KVM_SET_CPUID2``: the CPUID leaves the guest sees, before the first run.

        KVM also derives from them what the guest may use (e.g. EFER.LME needs the
        long-mode bit of leaf 0x80000001).

        Example::

            import pykvm
            with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
                vcpu = vm.create_vcpu(cpuid=False)
                assert vcpu.cpuid == ()
                vcpu.set_cpuid([entry for entry in kvm.supported_cpuid if entry.function in (0, 1)])
                functions = {entry.function for entry in vcpu.cpuid}
                assert {0, 1} <= functions and 0x80000001 not in functions   # no long mode now
        """
        entries = list(entries)
        for index, entry in enumerate(entries):
            checks.instance(f"entries[{index}]", entry, CpuidEntry, "CpuidEntry records, e.g. from "
                            "vcpu.cpuid or kvm.supported_cpuid")
        self._ioctl(Ioctl.SET_CPUID2, cpuid_to_c(entries),
                    hint="CPUID can only be set before the vCPU first runs")

    def setup_mce(self, mcg_cap: int) -> None:
        """``KVM_X86_SETUP_MCE``: machine-check banks and MCG_CAP (before the first run).

        ``mcg_cap`` is the MSR's value: the bank count in bits 7:0 (1 to
        ``kvm.check_extension(Cap.MCE)``), capability bits from ``kvm.mce_cap_supported``.

        Example::

            import pykvm
            from pykvm import Cap
            with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
                if kvm.check_extension(Cap.MCE) >= 4:
                    vcpu = vm.create_vcpu()
                    vcpu.setup_mce(kvm.mce_cap_supported | 4)      # four banks
                    assert vcpu.get_msrs([0x179])[0x179] & 0xFF == 4   # IA32_MCG_CAP
        """
        self.vm.kvm.require(Cap.MCE, "vcpu.setup_mce")
        checks.unsigned("mcg_cap", mcg_cap, 64, "an MCG_CAP value: banks in bits 7:0")
        self._ioctl(Ioctl.X86_SETUP_MCE, ffi.new("__u64 *", mcg_cap),
                    hint="the bank count must be 1 to KVM_CAP_MCE and the other bits within "
                         "KVM_X86_GET_MCE_CAP_SUPPORTED")

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """``KVM_GET_MSRS``: the values of the given MSR indices, read as the host (not as the guest).

        Example::

            import pykvm
            with pykvm.Kvm() as kvm, kvm.create_vm(irqchip="split") as vm:
                vcpu = vm.create_vcpu()
                msrs = vcpu.get_msrs([0x1B, 0x10])          # IA32_APIC_BASE, IA32_TSC
                assert msrs[0x1B] == 0xFEE00900              # xAPIC enabled, at 0xFEE00000, the BSP
                assert vcpu.get_msrs([0x10])[0x10] > msrs[0x10]
        """
        indices = [checks.unsigned("index", index, 32, "an MSR number") for index in indices]
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": len(indices), "entries": len(indices)})
        for entry, index in zip(msrs.entries, indices, strict=True):
            entry.index = index
        done = self._ioctl(Ioctl.GET_MSRS, msrs)
        if done != len(indices):
            raise ioctl_error(errno.EINVAL, "KVM_GET_MSRS", self.describe(),
                              f"MSR {indices[done]:#x} is not supported by this host")
        return {entry.index: entry.data for entry in msrs.entries[0:done]}

    def set_msrs(self, values: Mapping[int, int]) -> None:
        """``KVM_SET_MSRS``: write MSRs as the host; KVM stops at the first it refuses (raised, naming it).

        Example::

            import pykvm
            with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
                vcpu = vm.create_vcpu()
                star = 0x0023_0010 << 32                      # IA32_STAR: SYSCALL/SYSRET selectors
                vcpu.set_msrs({0xC0000081: star})
                assert vcpu.get_msrs([0xC0000081]) == {0xC0000081: star}
        """
        checks.instance("values", values, Mapping, "a dict {MSR index: value}")
        for index, value in values.items():
            checks.unsigned("index", index, 32, "an MSR number")
            checks.unsigned(f"values[{index:#x}]", value, 64)
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": len(values), "entries": len(values)})
        for entry, (index, value) in zip(msrs.entries, values.items(), strict=True):
            entry.index, entry.data = index, value
        done = self._ioctl(Ioctl.SET_MSRS, msrs)
        if done != len(values):
            index = list(values)[done]
            raise ioctl_error(errno.EINVAL, "KVM_SET_MSRS", self.describe(),
                              self._refused_msr_hint(index, values[index], done))

    def _refused_msr_hint(self, index: int, value: int, done: int) -> str:
        """Why KVM_SET_MSRS stopped at ``index``: no such MSR here, or a value it does not take."""
        prefix = f"KVM set {done} MSR(s), then refused MSR {index:#x} = {value:#x}: "
        try:
            current = self.get_msrs([index])[index]
        except KvmError:
            return (prefix + "this vCPU has no such MSR (KVM_GET_MSRS refuses it too); check the index, and "
                             "the CPUID feature that enumerates the MSR")
        note = _MSR_VALUE_NOTES.get(index, "")
        return (prefix + f"the MSR exists (now {current:#x}) but KVM does not take that value: it sets reserved "
                         f"bits, or bits of a feature the vCPU's CPUID does not enumerate"
                         f"{' (' + note + ')' if note else ''}; change only the bits you mean to, from the "
                         f"current value")

    def kvmclock_ctrl(self) -> None:
        """``KVM_KVMCLOCK_CTRL``: tell the guest it was paused (sets PVCLOCK_GUEST_STOPPED in its
        kvmclock page at the next entry, so its soft-lockup watchdog does not fire).

        Needs the guest to have enabled kvmclock (MSR_KVM_SYSTEM_TIME_NEW): EINVAL before.

        Example::

            import pykvm
            from pykvm import x86
            with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
                vcpu = vm.create_vcpu()
                x86.load_code(vcpu, "hlt", mode="real")
                vcpu.set_msrs({0x4B564D01: 0x3000 | 1})      # MSR_KVM_SYSTEM_TIME_NEW: kvmclock at 0x3000
                vcpu.kvmclock_ctrl()
                vcpu.run()
                assert vm.memory.read_u8(0x3000 + 29) & 2     # pvclock flags: PVCLOCK_GUEST_STOPPED
        """
        self._ioctl(Ioctl.KVMCLOCK_CTRL, hint="the guest has not enabled its kvmclock (MSR 0x4b564d01 with "
                                              "bit 0 set)")

    def get_nested_state(self) -> NestedState:
        """``KVM_GET_NESTED_STATE``: the vCPU's nested-virtualization state (L1's VMCB/VMCS, guest mode).

        Example::

            import pykvm
            from pykvm import Cap
            with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
                if kvm.check_extension(Cap.NESTED_STATE):
                    state = vm.create_vcpu().get_nested_state()
                    assert not state.guest_mode              # L1 has not entered a nested guest
        """
        size = self.vm.kvm.require(Cap.NESTED_STATE, "vcpu.get_nested_state()")
        cdata = ffi.from_buffer("struct kvm_nested_state *", bytearray(size))
        cdata.size = size                 # KVM_CAP_NESTED_STATE: the largest state, header included
        self._ioctl(Ioctl.GET_NESTED_STATE, cdata)
        return NestedState.from_c(cdata)

    def set_nested_state(self, state: NestedState) -> None:
        """``KVM_SET_NESTED_STATE``: restore nested state; in guest mode the vCPU's registers are L2's.

        KVM checks the state like a VM entry would and raises
        KVM_REQ_GET_NESTED_STATE_PAGES: before the next entry it maps the pages
        the state refers to (SVM: L1's MSR permission map).

        Example::

            import pykvm
            from pykvm import Cap
            with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
                if kvm.check_extension(Cap.NESTED_STATE):
                    vcpu = vm.create_vcpu()
                    state = vcpu.get_nested_state()
                    vcpu.set_nested_state(state)             # what migration does on the target
                    assert vcpu.get_nested_state().flags == state.flags
        """
        checks.instance("state", state, NestedState, "a pykvm.core.state.NestedState, e.g. NestedState.svm(...)")
        self.vm.kvm.require(Cap.NESTED_STATE, "vcpu.set_nested_state()")
        self._ioctl(Ioctl.SET_NESTED_STATE, state.to_c(),
                    hint=f"KVM refused the state: it needs nested virtualization (kvm_amd/kvm_intel nested=1), "
                         f"the vendor's format, EFER.SVME (or VMXON) in the vCPU and a consistent VMCB/VMCS "
                         f"({ffi.sizeof('struct kvm_nested_state')}-byte header + data)")

    def enable_cap(self, cap: Cap, *args: int, flags: int = 0) -> None:
        """``KVM_ENABLE_CAP`` on this vCPU (per-vCPU capabilities, e.g. ``Cap.HYPERV_SYNIC``).

        Example::

            import pykvm
            from pykvm import Cap
            with pykvm.Kvm() as kvm, kvm.create_vm(irqchip="kernel") as vm:
                if kvm.check_extension(Cap.HYPERV_SYNIC):
                    vcpu = vm.create_vcpu()
                    vcpu.enable_cap(Cap.HYPERV_SYNIC)
                    assert vcpu.get_msrs([0x40000081])[0x40000081] == 1   # HV_X64_MSR_SVERSION
        """
        self._enable_cap(cap, args, flags, hint="the host may not offer this capability (see kvm.check_extension), "
                                                 "or it must be enabled before the vCPU first runs")

    def _capability_source(self) -> FdObject:
        return self.vm

    def smi(self) -> None:
        """``KVM_SMI``: make a system-management interrupt pending (needs ``KVM_CAP_X86_SMM``).

        Example::

            import pykvm
            from pykvm import Cap
            with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
                if kvm.check_extension(Cap.X86_SMM):
                    vcpu = vm.create_vcpu()
                    vcpu.smi()
                    assert vcpu.events.smi.pending == 1
        """
        self.vm.kvm.require(Cap.X86_SMM, "vcpu.smi()")
        self._ioctl(Ioctl.SMI)

    def tpr_access_reporting(self, enabled: bool) -> None:
        """``KVM_TPR_ACCESS_REPORTING``: KVM reports guest accesses to the xAPIC TPR as ``TprAccessExit``.

        Example::

            import pykvm
            from pykvm import x86
            from pykvm.core.exits import TprAccessExit
            with pykvm.Kvm() as kvm, kvm.create_vm(irqchip="split") as vm:
                vcpu = vm.create_vcpu()
                vcpu.tpr_access_reporting(True)
                spin = "mov $5000, %ecx\\n1: loop 1b\\n"  # kvm_pvm reports late, in guest code that follows
                x86.load_code(vcpu, "movl $0x20, 0xFEE00080\\n" + spin + "out %al, $0x80", mode="protected")
                exit = vcpu.run()
                assert isinstance(exit, TprAccessExit) and exit.is_write
        """
        self.vm._require_irqchip(IrqchipMode.SPLIT, "TPR access reporting")
        self._ioctl(Ioctl.TPR_ACCESS_REPORTING, ffi.new("struct kvm_tpr_access_ctl *", {"enabled": int(bool(enabled))}))

    def set_single_step(self, enabled: bool) -> None:
        """``KVM_SET_GUEST_DEBUG`` single-step: one ``DebugExit`` per guest instruction.

        Example::

            import pykvm
            from pykvm import DebugExit, x86
            with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
                vcpu = vm.create_vcpu()
                x86.load_code(vcpu, "nop\\nnop\\nhlt", mode="real")
                vcpu.set_single_step(True)
                assert isinstance(vcpu.run(), DebugExit) and vcpu.regs.rip == 1
                assert isinstance(vcpu.run(), DebugExit) and vcpu.regs.rip == 2
        """
        self.vm.kvm.require(Cap.SET_GUEST_DEBUG, "single-stepping")
        control = (lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_SINGLESTEP) if enabled else 0
        self._ioctl(Ioctl.SET_GUEST_DEBUG, ffi.new("struct kvm_guest_debug *", {"control": control}))


def _needs_reply(run, reason: int) -> bool:
    """Whether the exit in ``run`` gives the guest data userspace must write first."""
    if reason == ExitReason.IO:
        return run.io.direction == IoDirection.IN
    if reason == ExitReason.MMIO:
        return not run.mmio.is_write
    return reason in (ExitReason.X86_RDMSR, ExitReason.HYPERCALL)


def _run_hint(err: int, vm: Vm) -> str:
    if not vm.memory.slots:
        return ("this VM has no guest memory (memory_size=0 and no vm.memory.add_slot()), so the vCPU has nothing "
                "to run; create the VM with memory_size > 0, or add a slot and load code before running")
    if err == errno.EFAULT:
        return "the guest touched memory KVM could not map (check the memory slots)"
    if err == errno.ENOEXEC:
        return "KVM found the guest state invalid"
    return ""


def install_kick_handler() -> None:
    """Install the no-op C handler for KICK_SIGNAL once per process (``kick()`` calls it itself).

    With it, ``signal.pthread_kill(thread, KICK_SIGNAL)`` only interrupts what that thread is
    blocked in (``KVM_RUN`` returns EINTR); without a handler a real-time signal's default action
    ends the process. Call it before kicking a vCPU thread by hand.
    """
    global _kick_handler_installed
    with _kick_handler_lock:
        if not _kick_handler_installed:
            result = lib.pykvm_install_kick_handler(KICK_SIGNAL)
            if result < 0:
                raise ioctl_error(-result, "sigaction", f"signal {KICK_SIGNAL}")
            _kick_handler_installed = True
