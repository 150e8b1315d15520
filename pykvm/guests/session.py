"""A booted guest image on one vCPU: commands, sync points and the vector log.

Why this exists: a test says "make the guest CLI, inject 0x40, read what its
handler logged" and nothing more. A session writes commands into the guest's
mailbox (:mod:`pykvm.guests.protocol`), runs the vCPU to the next sync point,
interprets each exit as a :class:`GuestStop`, and reads the vector log.
Every command has a deadline (:mod:`pykvm.runtime.watchdog`), so a guest
waiting for an interrupt that never comes fails the call instead of hanging it.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from typing import TYPE_CHECKING

from ..core import checks
from ..core.constants import IOAPIC_DEFAULT_BASE, IOAPIC_NUM_PINS, MpState
from ..core.errors import CommandTimeout, GuestCancelled, GuestError, HostLimitation, InvalidArgument, IrqchipModeError
from ..core.exits import (
    Exit,
    ExitExplainer,
    FailEntryExit,
    HltExit,
    InternalErrorExit,
    IntrExit,
    IoExit,
    IrqWindowOpenExit,
)
from ..core.state import record
from ..core.vcpu import Vcpu
from ..irqchip import waiting
from ..irqchip.ioapic import RedirectionEntry
from ..irqchip.lapic import ApicReg, icr
from ..runtime.watchdog import WATCHDOG
from ..x86.asm import Mode
from ..x86.modes import enter_mode
from ..x86.vectors import Vector, vector_name
from . import layout, protocol
from .log import LogRecord, parse_log
from .protocol import Command

if TYPE_CHECKING:
    from .images import GuestImage

COMMAND_TIMEOUT = 20.0     # seconds a guest command may run (generous for emulated hosts)


class StopKind(enum.Enum):
    """What a guest exit means in the image's protocol."""

    SYNC = "sync"            # reached a step, waits for a command
    VECTOR = "vector"        # a handler logged a vector (notify mode)
    DONE = "done"            # Command.DONE
    ASSERT = "assert"        # the guest found an impossible state
    HLT = "hlt"              # KVM_EXIT_HLT
    WINDOW = "irq-window"    # KVM_EXIT_IRQ_WINDOW_OPEN
    KICKED = "kicked"        # KVM_RUN returned EINTR (vcpu.kick() or another signal)
    OTHER = "other"          # anything else (the exit says what)


_PORT_KINDS = {protocol.PORT_SYNC: StopKind.SYNC, protocol.PORT_VECTOR: StopKind.VECTOR,
               protocol.PORT_DONE: StopKind.DONE, protocol.PORT_ASSERT: StopKind.ASSERT}


@record
class GuestStop:
    """One exit of the guest, interpreted: kind, value (step / vector / code), RIP, readiness."""

    kind: StopKind
    value: int
    rip: int
    ready_for_interrupt_injection: int
    if_flag: int
    exit: Exit = dataclasses.field(repr=False)
    time: float = dataclasses.field(repr=False, default=0.0)

    def describe(self) -> str:
        base = {StopKind.SYNC: f"sync: reached step {self.value}",
                StopKind.VECTOR: f"vector notify: handler logged {vector_name(self.value)}",
                StopKind.DONE: "guest done", StopKind.ASSERT: f"guest assert {self.value:#x}",
                StopKind.HLT: "HLT exit", StopKind.WINDOW: "IRQ_WINDOW_OPEN exit",
                StopKind.KICKED: "kicked (EINTR)"}.get(
                    self.kind, f"{type(self.exit).__name__}")
        return (f"{base} (RIP {self.rip:#x}, IF={self.if_flag}, "
                f"ready={self.ready_for_interrupt_injection})")


class GuestSession:
    """A booted guest image on one vCPU: commands, sync points and the vector log.

    The long-mode image is SMP-aware: boot it on several vCPUs of one VM and each
    session has its own mailbox, stack and log (``layout.cpu_area(vcpu.id)``).
    The real and protected images run on vCPU 0 only.

    ``explain`` (e.g. :func:`pykvm.hosts.explain_exit`) is called on each entry failure and
    internal error the vCPU returns; with it, an internal error that is a documented limit of
    this host raises :class:`HostLimitation` instead of :class:`GuestError`.
    """

    def __init__(self, image: GuestImage, vcpu: Vcpu, notify: bool = False,
                 explain: ExitExplainer | None = None) -> None:
        checks.instance("vcpu", vcpu, Vcpu, "the vCPU to boot the image on, e.g. vm.create_vcpu()")
        if image.mode != Mode.LONG and vcpu.id != 0:
            raise GuestError(f"the {image.mode.value}-mode image runs on vCPU 0 only (it has one "
                             f"mailbox and log below 1 MiB); boot the long-mode image on vCPU "
                             f"{vcpu.id}")
        self.image = image
        self.vcpu = vcpu
        self.explain = explain
        self.memory = vcpu.vm.memory
        self.area = layout.cpu_area(vcpu.id if image.mode == Mode.LONG else 0)
        self.stops: list[GuestStop] = []
        self.step = -1
        self.done = False
        self.cancelled = False
        self.x2apic = False
        memory = self.memory
        memory.write(layout.CODE, image.code)
        memory.fill(self.area.mailbox, protocol.MAILBOX_SIZE)
        memory.write_u64(self.area.mailbox + protocol.MB_LOG, self.area.log)
        memory.fill(self.area.log, layout.LOG_HEADER_SIZE)
        self.notify = notify
        enter_mode(vcpu, image.mode, image.origin)
        if image.mode == Mode.LONG:
            regs = vcpu.regs
            regs.r14, regs.rsp = self.area.mailbox, self.area.stack_top
            vcpu.regs = regs
        if vcpu.vm.irqchip.lapic_in_kernel:
            # With an in-kernel LAPIC, vCPUs other than the BSP wait for INIT/SIPI
            # (KVM_MP_STATE_UNINITIALIZED); the host places them directly instead.
            vcpu.mp_state = MpState.RUNNABLE

    # -- mailbox --------------------------------------------------------------
    def _mailbox(self, field: int) -> int:
        return self.area.mailbox + field

    @property
    def notify(self) -> bool:
        """Whether handlers also ``out`` each vector (one extra exit per delivery)."""
        return bool(self.memory.read_u32(self._mailbox(protocol.MB_NOTIFY)))

    @notify.setter
    def notify(self, value: bool) -> None:
        self.memory.write_u32(self._mailbox(protocol.MB_NOTIFY), int(bool(value)))

    @property
    def auto_eoi(self) -> bool:
        """Whether handlers EOI interrupts themselves (LAPIC in long mode, 8259 in real mode)."""
        return bool(self.memory.read_u32(self._mailbox(protocol.MB_AUTO_EOI)))

    @auto_eoi.setter
    def auto_eoi(self, value: bool) -> None:
        kind = (1 if self.image.mode == Mode.LONG else 2) if value else 0
        self.memory.write_u32(self._mailbox(protocol.MB_AUTO_EOI), kind)

    def address(self, symbol: str) -> int:
        return self.image.address(symbol)

    # -- running ----------------------------------------------------------------
    def run(self) -> GuestStop:
        """Run to the next exit and interpret it (no protocol handling)."""
        exit = self.vcpu.run()
        if self.explain is not None and isinstance(exit, (FailEntryExit, InternalErrorExit)):
            self.explain(self.vcpu, exit)
        run = self.vcpu.kvm_run
        kind, value = StopKind.OTHER, 0
        if isinstance(exit, IoExit) and exit.is_out and exit.port in _PORT_KINDS:
            kind, value = _PORT_KINDS[exit.port], exit.value
        elif isinstance(exit, HltExit):
            kind = StopKind.HLT
        elif isinstance(exit, IrqWindowOpenExit):
            kind = StopKind.WINDOW
        elif isinstance(exit, IntrExit):
            kind = StopKind.KICKED
        stop = GuestStop(kind, value, self.vcpu.regs.rip, run.ready_for_interrupt_injection,
                         run.if_flag, exit, time.perf_counter())
        self.stops.append(stop)
        if kind == StopKind.SYNC:
            self.step = value
        elif kind == StopKind.DONE:
            self.done = True
        return stop

    def run_until(self, *kinds: StopKind, max_exits: int = 100_000) -> GuestStop:
        """Run until an exit of one of ``kinds``; HLT, window and vector exits in between are resumed.

        Raises :class:`GuestError` on a guest assert or an exit the protocol does not
        expect, and :class:`HostLimitation` when the exit is a documented limit of this host.
        A kick resumes the guest unless :meth:`cancel` was called.
        """
        for _ in range(max_exits):
            stop = self.run()
            if stop.kind in kinds:
                return stop
            if stop.kind == StopKind.KICKED and self.cancelled:
                raise GuestCancelled(f"vCPU {self.vcpu.id} was cancelled at RIP {stop.rip:#x} "
                                     f"(step {self.step})", stop.exit)
            if stop.kind in (StopKind.VECTOR, StopKind.HLT, StopKind.WINDOW, StopKind.KICKED):
                continue
            raise self._unexpected(stop)
        raise GuestError(f"the guest made {max_exits} exits without reaching "
                         f"{', '.join(k.value for k in kinds)}")

    def _unexpected(self, stop: GuestStop) -> GuestError:
        exit = stop.exit
        if isinstance(exit, InternalErrorExit):
            error = HostLimitation if exit.host_limit else GuestError
            return error(exit.explanation or f"KVM_EXIT_INTERNAL_ERROR at RIP {stop.rip:#x} (step {self.step}, "
                                             f"reported as KVM gave it: this session has no explainer): {exit!r}", exit)
        if stop.kind == StopKind.ASSERT:
            return GuestError(f"guest assert {stop.value:#x} at RIP {stop.rip:#x}", exit)
        if stop.kind == StopKind.DONE:
            return GuestError("the guest already finished (Command.DONE)", exit)
        return GuestError(f"unexpected exit {exit} at RIP {stop.rip:#x} (step {self.step})", exit)

    def start(self) -> GuestStop:
        """Run the image's initialisation up to its first sync point (step 0)."""
        return self.run_until(StopKind.SYNC)

    def cancel(self) -> None:
        """Make a run_until() in another thread stop: kick the vCPU, raise GuestCancelled there."""
        self.cancelled = True
        self.vcpu.kick()

    def send(self, command: Command, arg: int = 0, arg2: int = 0) -> None:
        """Write the next command into the mailbox (executed at the next run)."""
        try:
            command = Command(command)
        except ValueError:
            raise InvalidArgument(f"command={checks.shown(command)}: not a guest command; use a "
                                  f"pykvm.guests.Command member (e.g. Command.NOP)") from None
        for name, value, widths in (("arg", arg, protocol.ARG_BITS), ("arg2", arg2, protocol.ARG2_BITS)):
            bits = widths.get(command, 64)
            checks.unsigned(name, value, bits, f"Command.{command.name} reads {bits} bit(s) of it")
        if command in protocol.LONG_MODE_ONLY and self.image.mode != Mode.LONG:
            raise GuestError(f"Command.{command.name} exists only in the long-mode image "
                             f"(this is the {self.image.mode.value}-mode one)")
        raisable = protocol.RAISABLE[self.image.mode.value]
        if command == Command.RAISE and arg not in raisable:
            raise InvalidArgument(f"arg={arg}: Command.RAISE of the {self.image.mode.value}-mode image raises "
                                  f"only vectors {sorted(raisable)}; inject any other exception with "
                                  f"pykvm.injection.Injector(vcpu).exception(), or raise it from your own code "
                                  f"(pykvm.assemble)")
        self.memory.write_u32(self._mailbox(protocol.MB_COMMAND), int(command))
        self.memory.write_u64(self._mailbox(protocol.MB_ARG), arg)
        self.memory.write_u64(self._mailbox(protocol.MB_ARG2), arg2)

    def command(self, command: Command, arg: int = 0, arg2: int = 0,
                timeout: float | None = COMMAND_TIMEOUT) -> GuestStop:
        """Send ``command`` and run to the next sync point (or DONE); returns that stop.

        A command still running after ``timeout`` seconds (a ``hlt`` waiting for an
        interrupt that never comes, say) is ended: the vCPU is kicked out of KVM_RUN
        and :class:`CommandTimeout` raised, saying what the vCPU waited for
        (:mod:`pykvm.irqchip.waiting`). A vCPU halted at the deadline is first run
        once more, for :func:`~pykvm.irqchip.waiting.grace` seconds: if it then
        reaches the sync point, its event had been pending all along, and the
        command returns with a :class:`~pykvm.irqchip.waiting.LostWakeup` warning.
        ``timeout=None`` waits for ever.
        """
        if timeout is not None:
            checks.seconds("timeout", timeout, "or None to wait for ever")
        if command == Command.WAIT_LOG:
            self._require_a_waker()
        self.send(command, arg, arg2)
        if command == Command.WRMSR:
            return self._check_wrmsr(self.log_count(), arg, arg2, self._command_stop(command, timeout))
        return self._command_stop(command, timeout)

    def _command_stop(self, command: Command, timeout: float | None) -> GuestStop:
        """Run the command already sent to its sync point, within ``timeout`` (see :meth:`command`)."""
        if timeout is None:
            return self.run_until(StopKind.SYNC, StopKind.DONE)
        name = f"Command.{Command(command).name}"
        try:
            return self._run_to_sync(timeout)
        except CommandTimeout as exc:
            halted, words = waiting.read_halted(self.vcpu)
            if halted is None:
                raise CommandTimeout(f"{name} did not reach a sync point within {timeout:g} s ({exc}); the session "
                                     f"is cancelled. At the deadline: {words}") from exc
            self.cancelled = False
            try:
                stop = self._run_to_sync(waiting.grace(timeout))
            except CommandTimeout as again:
                raise CommandTimeout(f"{name} did not reach a sync point within {timeout:g} s, nor in "
                                     f"{waiting.grace(timeout):g} s more ({again}); the session is cancelled. At "
                                     f"the deadline: {words}") from exc
            waiting.warn_lost_wakeup(f"{name} on vCPU {self.vcpu.id}", timeout, halted)
            return stop

    def _require_a_waker(self) -> None:
        """WAIT_LOG halts for interrupts: refuse it where nothing could deliver one (it would only time out)."""
        if not self.vcpu.vm.irqchip.lapic_in_kernel and self.vcpu.irq_controller is None:
            raise IrqchipModeError(
                f"Command.WAIT_LOG halts vCPU {self.vcpu.id} until interrupts arrive, but its VM has irqchip="
                f"'none' and the vCPU no UserspaceIrqController, so nothing can deliver one: it would only time "
                f"out; create the VM with irqchip='kernel' or 'split', or attach "
                f"pykvm.irqchip.UserspaceIrqController(vcpu) and raise_irq() from another thread")

    def _check_wrmsr(self, logged: int, value: int, index: int, stop: GuestStop) -> GuestStop:
        """Raise :class:`GuestError` if the guest's WRMSR took #GP (its handler logged it and resumed)."""
        faults = [record for record in self.records_since(logged)
                  if record.vector == Vector.GP and record.rip == self.address("wrmsr_wrmsr")]
        if faults:
            raise GuestError(f"Command.WRMSR: the guest's wrmsr of MSR {index:#x} = {value:#x} took "
                             f"#GP({faults[0].error_code:#x}) on vCPU {self.vcpu.id}: this vCPU has no such MSR "
                             f"or refuses that value (reserved bits, or a feature its CPUID lacks); the guest "
                             f"went on after it. Check the MSR against the vCPU's CPUID, or read it with "
                             f"vcpu.get_msrs([{index:#x}])", stop.exit)
        return stop

    def _run_to_sync(self, timeout: float) -> GuestStop:
        """run_until the next sync point or DONE; CommandTimeout (the session cancelled) after ``timeout`` s."""
        deadline = WATCHDOG.guard(timeout, self.cancel)
        try:
            with deadline:
                stop = self.run_until(StopKind.SYNC, StopKind.DONE)
        except GuestCancelled as exc:
            if not deadline.fired:
                raise
            raise CommandTimeout(f"vCPU {self.vcpu.id} stopped at step {self.step}, {exc}") from exc
        if deadline.fired:          # the deadline passed as the sync point came: nothing is left to cancel
            self.cancelled = False
        return stop

    # -- interrupt controllers, from inside the guest --------------------------------
    def apic_enable(self, x2apic: bool = False, auto_eoi: bool = True) -> None:
        """Software-enable this CPU's LAPIC (xAPIC MMIO or x2APIC MSRs); handlers EOI if ``auto_eoi``."""
        if not self.vcpu.vm.irqchip.lapic_in_kernel:
            raise IrqchipModeError("the guest's LAPIC exists only with an in-kernel irqchip: "
                                   "create the VM with irqchip='kernel' or 'split'")
        self.auto_eoi = auto_eoi
        self.command(Command.APIC_ENABLE, int(x2apic))
        self.x2apic = x2apic

    def apic_write(self, register: int, value: int) -> None:
        """The guest writes LAPIC ``register`` (xAPIC offset, pykvm.irqchip.lapic.ApicReg); ICR: 64 bits."""
        self.command(Command.APIC_WRITE, value, register)

    def apic_read(self, register: int) -> int:
        """The guest reads LAPIC ``register``."""
        self.command(Command.APIC_READ, 0, register)
        return self.memory.read_u64(self._mailbox(protocol.MB_RESULT))

    def eoi(self) -> None:
        """The guest writes the LAPIC EOI register."""
        self.apic_write(ApicReg.EOI, 0)

    def send_ipi(self, vector: int, destination: int = 0, **fields) -> None:
        """The guest writes its ICR: an IPI (fields as for :func:`pykvm.irqchip.lapic.icr`)."""
        self.apic_write(ApicReg.ICR_LOW, icr(vector, destination=destination,
                                              x2apic=self.x2apic, **fields))

    def ioapic_route(self, pin: int, entry: RedirectionEntry) -> None:
        """The guest programs IOAPIC redirection entry ``pin`` (high half, then low half)."""
        checks.integer("pin", pin, 0, IOAPIC_NUM_PINS - 1, f"the IOAPIC has {IOAPIC_NUM_PINS} pins")
        checks.instance("entry", entry, RedirectionEntry, "e.g. RedirectionEntry(vector=0x40)")
        self._require_kernel_irqchip("ioapic_route()", f"the IOAPIC's MMIO page at {IOAPIC_DEFAULT_BASE:#x}")
        bits = entry.bits
        self.command(Command.IOAPIC_WRITE, bits >> 32, 0x10 + 2 * pin + 1)
        self.command(Command.IOAPIC_WRITE, bits & 0xFFFFFFFF, 0x10 + 2 * pin)

    def pic_init(self, master_base: int = 0x20, slave_base: int = 0x28,
                 masks: int = 0x0000, auto_eoi: bool = True) -> None:
        """The guest initialises both 8259s (ICW1-4) with these vector bases and masks."""
        fix = "ICW2 takes the vector base's bits 7:3 (a multiple of 8)"
        for name, base in (("master_base", master_base), ("slave_base", slave_base)):
            if checks.unsigned(name, base, 8, fix) % 8:
                raise InvalidArgument(f"{name}={base:#x}: {fix}; pass {base & ~7:#x}")
        checks.unsigned("masks", masks, 16, "bit n masks IRQ n: master in bits 7:0, slave in bits 15:8")
        self._require_kernel_irqchip("pic_init()", "the 8259 PICs' ports 0x20, 0x21, 0xA0 and 0xA1")
        self.memory.write_u32(self._mailbox(protocol.MB_PIC_BASES), master_base | slave_base << 8)
        self.auto_eoi = auto_eoi
        self.command(Command.PIC_INIT, master_base | slave_base << 8 | masks << 16)

    def _require_kernel_irqchip(self, what: str, where: str) -> None:
        irqchip = self.vcpu.vm.irqchip
        if not irqchip.ioapic_in_kernel:
            raise IrqchipModeError(f"{what} has the guest program {where}, which KVM emulates only with "
                                   f"irqchip='kernel'; this VM's irqchip is {irqchip.value!r}, so the guest's "
                                   f"accesses would exit to userspace; create the VM with irqchip='kernel'")

    def wait_log(self, count: int) -> GuestStop:
        """Let the guest halt with interrupts on until its log holds ``count`` records."""
        return self.command(Command.WAIT_LOG, count)

    # -- the vector log ------------------------------------------------------------
    def log(self) -> list[LogRecord]:
        """Every vector this CPU's handlers logged, oldest first."""
        return parse_log(self.memory.read(self.area.log, layout.LOG_HEADER_SIZE
                                          + layout.LOG_CAPACITY * layout.LOG_RECORD_SIZE))

    def log_count(self) -> int:
        """How many records the guest has written so far."""
        return self.memory.read_u32(self.area.log)

    def records_since(self, count: int) -> list[LogRecord]:
        """Records written after the log held ``count`` records."""
        checks.unsigned("count", count, 32, "a log_count() taken earlier")
        return [r for r in self.log() if r.seq >= count]
