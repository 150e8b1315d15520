"""Kernel trace events of this process, recorded over a block: ``with trace.record(...) as t:``.

Why this exists: much of what KVM does between two exits (a kvmclock update, a
zapped MMU root, a timer re-armed on another CPU) is visible to userspace only
as a tracepoint. This module records the named events for the duration of a
``with`` block, in a tracefs *instance* of its own (``instances/pykvm-<pid>-<n>``,
its own ring buffer: the global buffer and other users' instances are never
touched), filtered to this process (``set_event_pid`` holds every thread of
it, ``event-fork`` adds the threads it starts; ``record-tgid`` lets each line
be checked again), and removes the instance afterwards, also when the block
raises::

    with trace.record("kvm:kvm_pio", "kvm:kvm_userspace_exit") as t:
        vcpu.run()
    assert t.fired == {"kvm:kvm_pio", "kvm:kvm_userspace_exit"}
    print(t.events[0].fields["port"])

Field names, offsets, sizes and signedness come from each event's ``format``
file (:func:`parse_format`); the instance prints every field as
``name=0xhex (decimal)`` (the ``fields`` trace option), and
:func:`parse_trace` reads that text back with the names of the format, in its
order, applying the format's size and signedness. Event times use the
``mono`` trace clock: the same clock as :func:`time.monotonic`.

tracefs is found in ``/proc/self/mountinfo``; when it is not mounted and the
process is root it is mounted at ``/sys/kernel/tracing``. Without permission
:class:`TracingUnavailable` says what to do. Requested events that do not
exist on this kernel are reported (``t.missing``), not an error.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import errno
import itertools
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ..core.errors import PyKvmError

DEFAULT_MOUNT = Path("/sys/kernel/tracing")
TRACE_CLOCK = "mono"                 # the clock of time.monotonic()
_COUNTER = itertools.count()
COMMON_PREFIX = "common_"


class TraceError(PyKvmError):
    """Tracing failed (bad event name, unreadable format, a tracefs write refused)."""


class TracingUnavailable(TraceError):
    """tracefs is missing or this process may not use it; the message says what to do."""


# ---- format files ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Field:
    """One field of an event record, as its ``format`` file declares it."""

    name: str
    type: str
    offset: int
    size: int
    signed: bool

    @property
    def common(self) -> bool:
        return self.name.startswith(COMMON_PREFIX)

    @property
    def is_string(self) -> bool:
        return "char" in self.type and ("[" in self.type or "__data_loc" in self.type)

    @property
    def is_array(self) -> bool:
        return "[" in self.type or "__data_loc" in self.type

    def convert(self, raw: int) -> int:
        """An integer printed in hex, cut to this field's size and read with its signedness."""
        bits = 8 * self.size
        raw &= (1 << bits) - 1
        if self.signed and raw >> (bits - 1):
            raw -= 1 << bits
        return raw


@dataclasses.dataclass(frozen=True)
class EventFormat:
    """An event's ``format`` file: id, fields (common ones apart) and print format."""

    system: str
    name: str
    id: int
    common_fields: tuple[Field, ...]
    fields: tuple[Field, ...]
    print_fmt: str = ""

    @property
    def full_name(self) -> str:
        return f"{self.system}:{self.name}"

    def field(self, name: str) -> Field:
        for field in self.fields + self.common_fields:
            if field.name == name:
                return field
        raise TraceError(f"event {self.full_name} has no field {name!r}; its fields: "
                         f"{', '.join(f.name for f in self.fields)}")


_FIELD_LINE = re.compile(r"^\s*field:\s*(?P<decl>[^;]+);\s*offset:\s*(?P<offset>\d+);\s*"
                         r"size:\s*(?P<size>\d+);\s*signed:\s*(?P<signed>\d+);")


def _split_declaration(decl: str) -> tuple[str, str]:
    """``unsigned int vcpu_id`` -> (``unsigned int``, ``vcpu_id``); ``u8 data[16]`` keeps ``[16]`` in the type."""
    decl = decl.strip()
    match = re.match(r"^(?P<type>.*?)(?P<name>\w+)\s*(?P<array>\[[^\]]*\])?$", decl)
    if match is None:
        raise TraceError(f"cannot read the field declaration {decl!r} of a format file")
    kind = (match["type"].strip() + (match["array"] or "")).strip()
    return kind, match["name"]


def parse_format(text: str, system: str = "") -> EventFormat:
    """Parse the text of ``events/<system>/<name>/format``."""
    name, event_id, print_fmt = "", -1, ""
    fields: list[Field] = []
    for line in text.splitlines():
        if line.startswith("name:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("ID:"):
            event_id = int(line.split(":", 1)[1])
        elif line.startswith("print fmt:"):
            print_fmt = line.split(":", 1)[1].strip()
        else:
            match = _FIELD_LINE.match(line)
            if match:
                kind, field_name = _split_declaration(match["decl"])
                fields.append(Field(field_name, kind, int(match["offset"]), int(match["size"]),
                                    match["signed"] == "1"))
    if not name or not fields:
        raise TraceError(f"not an event format file (no name or no fields): {text[:80]!r}")
    return EventFormat(system, name, event_id, tuple(f for f in fields if f.common),
                       tuple(f for f in fields if not f.common), print_fmt)


def split_event_name(event: str) -> tuple[str, str]:
    """``"kvm:kvm_pio"`` -> (``kvm``, ``kvm_pio``); the system is required."""
    system, sep, name = event.partition(":")
    if not sep or not system or not name or "/" in event or any(c.isspace() for c in event):
        raise TraceError(f"event {event!r}: name events as 'system:event', e.g. 'kvm:kvm_pio' "
                         f"(the folders under events/ of tracefs)")
    return system, name


def read_formats(events_dir: Path, names: Iterable[str]) -> tuple[dict[str, EventFormat], list[str]]:
    """The formats of the named events under ``events_dir``, and the names that do not exist."""
    formats: dict[str, EventFormat] = {}
    missing: list[str] = []
    for event in names:
        system, name = split_event_name(event)
        path = events_dir / system / name / "format"
        try:
            text = path.read_text()
        except FileNotFoundError:
            missing.append(event)
            continue
        except PermissionError as exc:
            raise TracingUnavailable(f"cannot read {path}: {exc.strerror}; {_PERMISSION_FIX}") from exc
        formats[event] = parse_format(text, system)
    return formats, missing


# ---- the trace text ----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TraceEvent:
    """One recorded event: ``t.events[0].fields["port"]``, or ``event["port"]``."""

    name: str                # system:event
    time: float              # seconds on the trace clock (mono: comparable with time.monotonic())
    cpu: int
    pid: int                 # the thread (common_pid)
    tgid: int | None         # its process, where the kernel knew it
    comm: str
    fields: Mapping[str, Any]

    def __getitem__(self, name: str) -> Any:
        return self.fields[name]

    def describe(self) -> str:
        shown = " ".join(f"{key}={_show(value)}" for key, value in self.fields.items())
        return f"{self.name} cpu {self.cpu} pid {self.pid}: {shown}"


def _show(value: Any) -> str:
    return f"{value:#x}" if isinstance(value, int) and abs(value) > 9 else str(value)


_LINE = re.compile(r"^\s*(?P<comm>.+)-(?P<pid>\d+)\s+(?:\(\s*(?P<tgid>[\d-]+)\)\s+)?\[(?P<cpu>\d+)\]\s+"
                   r"(?:(?P<flags>\S+)\s+)?(?P<time>\d+\.\d+):\s+(?P<event>\w+):\s?(?P<rest>.*)$")
# "0x1 (1)"; a one-byte field prints as a character, bare or quoted ('a'), or nothing, then "(1)".
_NUMBER = re.compile(r"^(?:(?P<hex>-?0x[0-9a-fA-F]+)|'[^']{0,4}'|.)?\s*(?:\((?P<dec>-?\d+)\))?$")


def _field_value(field: Field, text: str) -> Any:
    text = text.strip()
    match = _NUMBER.match(text)
    if match and (match["hex"] or match["dec"]) and not field.is_string:
        return field.convert(int(match["hex"], 16) if match["hex"] else int(match["dec"]))
    if text.startswith("ARRAY[") and text.endswith("]"):
        items = [item.strip() for item in text[6:-1].split(",") if item.strip()]
        try:
            return bytes(int(item, 16) for item in items)
        except ValueError:
            return text
    if not field.is_string and re.fullmatch(r"-?\d+", text):
        return int(text)
    if field.size == 1 and not field.is_array and len(text) == 1:     # a char-typed byte printed as %c
        code = ord(text)
        return field.convert(code - 0xDC00 if 0xDC80 <= code <= 0xDCFF else code)
    return text


def _field_pattern(fmt: EventFormat) -> re.Pattern[str]:
    """``name1=(.*?) name2=(.*?) ... nameN=(.*)``: the names and their order come from the format."""
    names = [field.name for field in fmt.fields]
    parts = [rf"{re.escape(name)}=(?P<f{index}>.*?)" for index, name in enumerate(names)]
    if not parts:
        return re.compile(r"^\s*$")
    return re.compile(r"^\s*" + r"\s+".join(parts) + r"\s*$")


def parse_trace(text: str, formats: Mapping[str, EventFormat],
                pids: Iterable[int] | None = None, tgid: int | None = None) -> list[TraceEvent]:
    """The events in a tracefs ``trace`` text printed with the ``fields`` option.

    Lines of events not in ``formats`` (keyed ``system:event``) are skipped, as
    are comments. With ``tgid`` (and/or ``pids``), only lines of that process
    (or those threads) are kept: a second check behind ``set_event_pid``.
    """
    by_name = {fmt.name: fmt for fmt in formats.values()}
    patterns = {fmt.name: _field_pattern(fmt) for fmt in formats.values()}
    wanted_pids = set(pids) if pids is not None else None
    events: list[TraceEvent] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _LINE.match(line)
        if match is None or match["event"] not in by_name:
            continue
        fmt = by_name[match["event"]]
        pid = int(match["pid"])
        line_tgid = int(match["tgid"]) if match["tgid"] and match["tgid"].strip("-") else None
        if tgid is not None or wanted_pids is not None:
            ours = (line_tgid == tgid) if (tgid is not None and line_tgid is not None) else False
            ours = ours or (wanted_pids is not None and pid in wanted_pids)
            if not ours:
                continue
        values = patterns[fmt.name].match(match["rest"])
        if values is None:
            raise TraceError(f"the line of {fmt.full_name} does not list its format's fields "
                             f"({', '.join(f.name for f in fmt.fields)}) as name=value: {line!r}")
        fields = {field.name: _field_value(field, values[f"f{index}"])
                  for index, field in enumerate(fmt.fields)}
        events.append(TraceEvent(fmt.full_name, float(match["time"]), int(match["cpu"]), pid, line_tgid,
                                 match["comm"].strip(), fields))
    return events


# ---- tracefs -------------------------------------------------------------------

_PERMISSION_FIX = ("tracing needs root (or CAP_SYS_ADMIN / CAP_PERFMON with tracefs mounted and "
                   "readable): run as root, e.g. sudo, or `sudo mount -t tracefs nodev /sys/kernel/tracing` "
                   "and give your user write access to it")


def find_tracefs(mountinfo: str = "/proc/self/mountinfo") -> Path | None:
    """Where tracefs is mounted, or None."""
    try:
        lines = Path(mountinfo).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        left, sep, right = line.partition(" - ")
        if sep and right.split()[0] == "tracefs":
            return Path(left.split()[4].replace("\\040", " "))
    return None


def mount_tracefs(target: Path = DEFAULT_MOUNT) -> Path:
    """Mount tracefs at ``target`` (root only)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.mount(b"nodev", str(target).encode(), b"tracefs", 0, None) != 0:
        err = ctypes.get_errno()
        raise TracingUnavailable(f"mounting tracefs at {target} failed: {os.strerror(err)}; "
                                 f"{_PERMISSION_FIX}")
    return target


def tracefs_root() -> Path:
    """The mounted tracefs, mounting it when this process is root and it is not mounted."""
    root = find_tracefs()
    if root is not None:
        return root
    if not DEFAULT_MOUNT.is_dir():
        raise TracingUnavailable(f"tracefs is not mounted and {DEFAULT_MOUNT} does not exist: this kernel "
                                 f"may lack CONFIG_TRACING; kernel events cannot be recorded here")
    if os.geteuid() != 0:
        raise TracingUnavailable(f"tracefs is not mounted; {_PERMISSION_FIX}")
    return mount_tracefs(DEFAULT_MOUNT)


class Tracefs:
    """The tracefs operations :func:`record` needs; tests substitute a synthetic directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def events_dir(self) -> Path:
        return self.root / "events"

    def make_instance(self, name: str) -> Path:
        path = self.root / "instances" / name
        try:
            os.mkdir(path)
        except PermissionError as exc:
            raise TracingUnavailable(f"cannot create the trace instance {path}: {exc.strerror}; "
                                     f"{_PERMISSION_FIX}") from exc
        except FileNotFoundError as exc:
            raise TracingUnavailable(f"{self.root} has no instances/ folder: this kernel cannot give "
                                     f"pykvm a ring buffer of its own (Linux 3.10 or later needed)") from exc
        return path

    def remove_instance(self, path: Path) -> None:
        for attempt in range(50):          # EBUSY while a reader still has a file open
            try:
                os.rmdir(path)
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                if exc.errno != errno.EBUSY or attempt == 49:
                    raise
                time.sleep(0.02)

    def write(self, path: Path, value: str) -> None:
        try:
            with open(path, "w") as file:
                file.write(value)
        except OSError as exc:
            raise TraceError(f"writing {value!r} to {path} failed: {exc.strerror}") from exc

    def read(self, path: Path) -> str:
        return path.read_text(errors="surrogateescape")     # a %c byte field keeps its value


def process_threads(pid: int | None = None) -> list[int]:
    """Every thread id of ``pid`` (this process by default)."""
    pid = os.getpid() if pid is None else pid
    try:
        return sorted(int(name) for name in os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return [pid]


@dataclasses.dataclass
class Recording:
    """What a :func:`record` block saw; ``events`` is filled in when the block ends."""

    requested: tuple[str, ...]
    formats: dict[str, EventFormat]
    missing: tuple[str, ...]
    instance: Path
    pid: int
    events: list[TraceEvent] = dataclasses.field(default_factory=list)
    lost: int = 0
    finished: bool = False

    @property
    def present(self) -> tuple[str, ...]:
        """The requested events that exist on this kernel."""
        return tuple(name for name in self.requested if name in self.formats)

    @property
    def fired(self) -> set[str]:
        """The requested events that fired at least once."""
        return {event.name for event in self.events}

    @property
    def silent(self) -> tuple[str, ...]:
        """The requested events that exist but never fired."""
        return tuple(name for name in self.present if name not in self.fired)

    def named(self, name: str) -> list[TraceEvent]:
        return [event for event in self.events if event.name == name]

    def count(self, name: str) -> int:
        return len(self.named(name))

    def summary(self) -> str:
        parts = [f"{name} x{self.count(name)}" for name in self.present if self.count(name)]
        if self.silent:
            parts.append("silent: " + ", ".join(self.silent))
        if self.missing:
            parts.append("not on this kernel: " + ", ".join(self.missing))
        if self.lost:
            parts.append(f"{self.lost} events lost (ring buffer overrun)")
        return "; ".join(parts) or "no events requested"


def _lost_events(fs: Tracefs, instance: Path) -> int:
    lost = 0
    per_cpu = instance / "per_cpu"
    if not per_cpu.is_dir():
        return 0
    for cpu in per_cpu.iterdir():
        try:
            text = fs.read(cpu / "stats")
        except OSError:
            continue
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("overrun", "dropped events"):
                with contextlib.suppress(ValueError):
                    lost += int(value)
    return lost


@contextlib.contextmanager
def record(*events: str, tracefs: Tracefs | None = None, buffer_kb: int | None = None,
           pid: int | None = None) -> Iterator[Recording]:
    """Record ``events`` (``"system:event"``) of this process over the ``with`` block.

    Yields a :class:`Recording`: ``t.events`` (typed records), ``t.fired``,
    ``t.missing`` (requested but not on this kernel), ``t.silent``. The tracefs
    instance is removed when the block ends, whether or not it raised.
    """
    if not events:
        raise TraceError("trace.record(): name at least one event, e.g. 'kvm:kvm_pio'")
    for event in events:
        split_event_name(event)
    fs = tracefs if tracefs is not None else Tracefs(tracefs_root())
    pid = os.getpid() if pid is None else pid
    formats, missing = read_formats(fs.events_dir, events)
    instance = fs.make_instance(f"pykvm-{pid}-{next(_COUNTER)}")
    recording = Recording(tuple(events), formats, tuple(missing), instance, pid)
    try:
        fs.write(instance / "tracing_on", "0")
        if buffer_kb is not None:
            fs.write(instance / "buffer_size_kb", str(buffer_kb))
        fs.write(instance / "trace_clock", TRACE_CLOCK)
        for option in ("fields", "record-tgid", "event-fork"):
            fs.write(instance / "options" / option, "1")
        fs.write(instance / "set_event_pid", " ".join(map(str, process_threads(pid))))
        if formats:
            fs.write(instance / "set_event", "\n".join(formats) + "\n")
        fs.write(instance / "tracing_on", "1")
        yield recording
        fs.write(instance / "tracing_on", "0")
        recording.lost = _lost_events(fs, instance)
        recording.events = parse_trace(fs.read(instance / "trace"), formats,
                                       pids=process_threads(pid), tgid=pid)
        recording.finished = True
    finally:
        with contextlib.suppress(OSError, TraceError):
            fs.write(instance / "tracing_on", "0")
        with contextlib.suppress(OSError, TraceError):
            fs.write(instance / "set_event", "")
        fs.remove_instance(instance)


def leftover_instances(tracefs: Tracefs | None = None, pid: int | None = None) -> list[str]:
    """Instances named ``pykvm-<pid>-*`` still present (none, unless something went wrong)."""
    fs = tracefs if tracefs is not None else Tracefs(tracefs_root())
    prefix = f"pykvm-{os.getpid() if pid is None else pid}-"
    try:
        return sorted(name for name in os.listdir(fs.root / "instances") if name.startswith(prefix))
    except FileNotFoundError:
        return []
