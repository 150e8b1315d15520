"""The packaged guest images and the host side of their protocol.

Why this exists: a test author wants "boot the long-mode guest, make it CLI,
inject 0x40, read what its handler logged" in a few lines. The images
(``guests/{real,protected,long}.S``, assembled at install time) install
handlers for all 256 vectors that append records to a vector log in guest
memory, and talk to the host through a mailbox and ``out`` to a few ports
(``pykvm.layout``). This module loads an image, boots it on a vCPU and gives
the command / sync / log API::

    with pykvm.guests.boot("long") as guest:
        guest.command(Command.STI)
        guest.vcpu.interrupt(0x40)
        guest.command(Command.NOP)
        assert guest.log()[-1].vector == 0x40
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import time
from pathlib import Path

from .. import layout, x86
from ..asm import Mode
from ..errors import GuestError, HostLimitation, PyKvmError
from ..exits import Exit, HltExit, InternalErrorExit, IoExit, IrqWindowOpenExit
from ..layout import Command
from ..state import record

IMAGES_DIR = Path(__file__).resolve().parent / "images"
MODES = tuple(mode.value for mode in Mode)


@dataclasses.dataclass(frozen=True)
class GuestImage:
    """An assembled guest: flat code, label addresses and the mode it runs in."""

    mode: Mode
    code: bytes
    origin: int
    symbols: dict

    @property
    def source(self) -> Path:
        """The GNU-assembler source the image was built from (shipped beside it)."""
        return IMAGES_DIR / f"{self.mode.value}.S"

    def address(self, symbol: str) -> int:
        """A label's address: what RIP (IP in real mode) holds there."""
        try:
            return self.symbols[symbol]
        except KeyError:
            raise KeyError(f"the {self.mode.value} image has no label {symbol!r}") from None

    def boot(self, vcpu, notify: bool = False) -> "GuestSession":
        """Load the image into the vCPU's VM, enter its mode and run to the first sync point."""
        session = GuestSession(self, vcpu, notify)
        session.start()
        return session


@functools.lru_cache(maxsize=None)
def load(mode: Mode | str) -> GuestImage:
    """The packaged image for ``"real"``, ``"protected"`` or ``"long"`` mode."""
    try:
        mode = Mode(mode)
    except ValueError:
        raise ValueError(f"no guest image for mode {mode!r}; choose one of {', '.join(MODES)}") from None
    binary, meta = IMAGES_DIR / f"{mode.value}.bin", IMAGES_DIR / f"{mode.value}.json"
    if not binary.exists() or not meta.exists():
        raise PyKvmError(f"guest image {binary} is missing: the images are assembled at install "
                         f"time; reinstall pykvm (`pip install -e .`) with binutils present")
    info = json.loads(meta.read_text())
    return GuestImage(mode, binary.read_bytes(), info["origin"], info["symbols"])


@dataclasses.dataclass(frozen=True)
class LogRecord:
    """One vector the guest's handler received, as it logged it."""

    seq: int
    vector: int
    cs: int
    error_code: int | None
    rip: int
    rflags: int
    tsc: int
    cr2: int | None
    rsp: int
    cpu: int
    fixed_up: bool

    @property
    def name(self) -> str:
        return x86.vector_name(self.vector)

    @property
    def interrupts_were_enabled(self) -> bool:
        """RFLAGS.IF of the interrupted code."""
        return bool(self.rflags & x86.RFLAGS_IF)

    def __repr__(self) -> str:
        extra = "".join([f" err={self.error_code:#x}" if self.error_code is not None else "",
                         f" cr2={self.cr2:#x}" if self.cr2 is not None else "",
                         " fixed-up" if self.fixed_up else ""])
        return (f"LogRecord(#{self.seq} {self.name} at {self.cs:#x}:{self.rip:#x} "
                f"rflags={self.rflags:#x}{extra} cpu={self.cpu})")


def parse_record(raw: bytes) -> LogRecord:
    """Decode one ``LOG_RECORD_SIZE``-byte record (layout in :mod:`pykvm.layout`)."""
    def field(offset: int, size: int) -> int:
        return int.from_bytes(raw[offset:offset + size], "little")
    flags = field(layout.REC_FLAGS, 4)
    return LogRecord(
        seq=field(layout.REC_SEQ, 4), vector=field(layout.REC_VECTOR, 2), cs=field(layout.REC_CS, 2),
        error_code=field(layout.REC_ERROR_CODE, 4) if flags & layout.REC_FLAG_ERROR_CODE else None,
        rip=field(layout.REC_RIP, 8), rflags=field(layout.REC_RFLAGS, 8), tsc=field(layout.REC_TSC, 8),
        cr2=field(layout.REC_CR2, 8) if flags & layout.REC_FLAG_CR2 else None,
        rsp=field(layout.REC_RSP, 8), cpu=field(layout.REC_CPU, 4),
        fixed_up=bool(flags & layout.REC_FLAG_FIXUP))


def parse_log(raw: bytes) -> list[LogRecord]:
    """Decode the whole log area (header + records), oldest first; wraps after LOG_CAPACITY."""
    count = int.from_bytes(raw[0:4], "little")
    capacity = int.from_bytes(raw[4:8], "little") or layout.LOG_CAPACITY
    first = max(0, count - capacity)
    records = []
    for seq in range(first, count):
        start = layout.LOG_HEADER_SIZE + (seq % capacity) * layout.LOG_RECORD_SIZE
        records.append(parse_record(raw[start:start + layout.LOG_RECORD_SIZE]))
    return records


class StopKind(enum.Enum):
    """What a guest exit means in the image's protocol."""

    SYNC = "sync"            # reached a step, waits for a command
    VECTOR = "vector"        # a handler logged a vector (notify mode)
    DONE = "done"            # Command.DONE
    ASSERT = "assert"        # the guest found an impossible state
    HLT = "hlt"              # KVM_EXIT_HLT
    WINDOW = "irq-window"    # KVM_EXIT_IRQ_WINDOW_OPEN
    OTHER = "other"          # anything else (the exit says what)


_PORT_KINDS = {layout.PORT_SYNC: StopKind.SYNC, layout.PORT_VECTOR: StopKind.VECTOR,
               layout.PORT_DONE: StopKind.DONE, layout.PORT_ASSERT: StopKind.ASSERT}


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
                StopKind.VECTOR: f"vector notify: handler logged {x86.vector_name(self.value)}",
                StopKind.DONE: "guest done", StopKind.ASSERT: f"guest assert {self.value:#x}",
                StopKind.HLT: "HLT exit", StopKind.WINDOW: "IRQ_WINDOW_OPEN exit"}.get(
                    self.kind, f"{type(self.exit).__name__}")
        return (f"{base} (RIP {self.rip:#x}, IF={self.if_flag}, "
                f"ready={self.ready_for_interrupt_injection})")


class GuestSession:
    """A booted guest image on one vCPU: commands, sync points and the vector log."""

    def __init__(self, image: GuestImage, vcpu, notify: bool = False) -> None:
        self.image = image
        self.vcpu = vcpu
        self.memory = vcpu.vm.memory
        self.stops: list[GuestStop] = []
        self.step = -1
        self.done = False
        memory = self.memory
        memory.write(layout.CODE, image.code)
        memory.fill(layout.MAILBOX, 0x100)
        memory.fill(layout.LOG, layout.LOG_HEADER_SIZE)
        self.notify = notify
        x86.enter_mode(vcpu, image.mode, image.origin)

    # -- mailbox --------------------------------------------------------------
    @property
    def notify(self) -> bool:
        """Whether handlers also ``out`` each vector (one extra exit per delivery)."""
        return bool(self.memory.read_u32(layout.MAILBOX + layout.MB_NOTIFY))

    @notify.setter
    def notify(self, value: bool) -> None:
        self.memory.write_u32(layout.MAILBOX + layout.MB_NOTIFY, int(bool(value)))

    def address(self, symbol: str) -> int:
        return self.image.address(symbol)

    # -- running ----------------------------------------------------------------
    def run(self) -> GuestStop:
        """Run to the next exit and interpret it (no protocol handling)."""
        exit = self.vcpu.run()
        run = self.vcpu.kvm_run
        kind, value = StopKind.OTHER, 0
        if isinstance(exit, IoExit) and exit.is_out and exit.port in _PORT_KINDS:
            kind, value = _PORT_KINDS[exit.port], exit.value
        elif isinstance(exit, HltExit):
            kind = StopKind.HLT
        elif isinstance(exit, IrqWindowOpenExit):
            kind = StopKind.WINDOW
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
        """
        for _ in range(max_exits):
            stop = self.run()
            if stop.kind in kinds:
                return stop
            if stop.kind in (StopKind.VECTOR, StopKind.HLT, StopKind.WINDOW):
                continue
            raise self._unexpected(stop)
        raise GuestError(f"the guest made {max_exits} exits without reaching "
                         f"{', '.join(k.value for k in kinds)}")

    def _unexpected(self, stop: GuestStop) -> GuestError:
        exit = stop.exit
        if isinstance(exit, InternalErrorExit):
            error = HostLimitation if exit.host_limit else GuestError
            return error(exit.explanation, exit)
        if stop.kind == StopKind.ASSERT:
            return GuestError(f"guest assert {stop.value:#x} at RIP {stop.rip:#x}", exit)
        if stop.kind == StopKind.DONE:
            return GuestError("the guest already finished (Command.DONE)", exit)
        return GuestError(f"unexpected exit {exit} at RIP {stop.rip:#x} (step {self.step})", exit)

    def start(self) -> GuestStop:
        """Run the image's initialisation up to its first sync point (step 0)."""
        return self.run_until(StopKind.SYNC)

    def send(self, command: Command, arg: int = 0) -> None:
        """Write the next command into the mailbox (executed at the next run)."""
        self.memory.write_u32(layout.MAILBOX + layout.MB_COMMAND, int(command))
        self.memory.write_u64(layout.MAILBOX + layout.MB_ARG, arg)

    def command(self, command: Command, arg: int = 0) -> GuestStop:
        """Send ``command`` and run to the next sync point (or DONE); returns that stop."""
        self.send(command, arg)
        return self.run_until(StopKind.SYNC, StopKind.DONE)

    # -- the vector log ------------------------------------------------------------
    def log(self) -> list[LogRecord]:
        """Every vector the guest's handlers logged, oldest first."""
        return parse_log(self.memory.read(layout.LOG, layout.LOG_HEADER_SIZE
                                          + layout.LOG_CAPACITY * layout.LOG_RECORD_SIZE))

    def log_count(self) -> int:
        """How many records the guest has written so far."""
        return self.memory.read_u32(layout.LOG)

    def records_since(self, count: int) -> list[LogRecord]:
        """Records written after the log held ``count`` records."""
        return [r for r in self.log() if r.seq >= count]


@dataclasses.dataclass
class BootedGuest:
    """``boot()``'s result: a guest session owning its Kvm, Vm and Vcpu (closed together)."""

    session: GuestSession
    kvm: object
    vm: object

    def __getattr__(self, name: str):
        return getattr(self.session, name)

    def close(self) -> None:
        self.vm.close()
        self.kvm.close()

    def __enter__(self) -> GuestSession:
        return self.session

    def __exit__(self, *exc_info) -> None:
        self.close()


def boot(mode: Mode | str = Mode.LONG, notify: bool = False, memory_size: int | None = None) -> BootedGuest:
    """Open ``/dev/kvm``, create a VM and vCPU, boot the ``mode`` image: ``with boot("long") as g:``."""
    from ..kvm import Kvm
    image = load(mode)
    kvm = Kvm()
    vm = None
    try:
        vm = kvm.create_vm(memory_size=memory_size)
        return BootedGuest(image.boot(vm.create_vcpu(), notify=notify), kvm, vm)
    except BaseException:
        if vm is not None:
            vm.close()
        kvm.close()
        raise

