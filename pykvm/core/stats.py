"""KVM's binary statistics (``KVM_GET_STATS_FD``): counters by name, and their change over a block.

Why this exists: how many exits, emulated instructions, injections or halts a
guest path costs is something a test wants to assert, and KVM counts exactly
that per VM and per vCPU. ``KVM_GET_STATS_FD`` (Documentation/virt/kvm/api.rst)
returns a read-only fd holding, at offsets the header gives:

* a header: flags, ``name_size``, ``num_desc``, ``id_offset``, ``desc_offset``, ``data_offset``;
* an id string (``kvm-<pid>`` for a VM, ``kvm-<pid>/vcpu-<n>`` for a vCPU);
* ``num_desc`` descriptors, each 16 bytes of ``struct kvm_stats_desc`` followed by
  a ``name_size``-byte NUL-padded name;
* a data block of u64 values; descriptor ``offset`` is relative to its start and
  ``size`` is how many u64 the statistic has (more than one for a histogram).

The header and descriptors never change for an fd, so :class:`Stats` parses
them once; each :meth:`Stats.read` is a single ``pread`` of the whole data block.
``with stats.delta() as d:`` reads before and after a block and gives the
difference of every cumulative counter::

    with vcpu.stats.delta() as d:
        guest.command(Command.NOP)
    assert d["exits"] >= 1
"""

from __future__ import annotations

import dataclasses
import os
import struct
import time
from collections.abc import ItemsView, Iterable
from typing import Any

from .constants import (
    STATS_BASE_SHIFT,
    STATS_TYPE_SHIFT,
    STATS_UNIT_SHIFT,
    Cap,
    StatsBase,
    StatsType,
    StatsUnit,
    as_enum,
)
from .errors import ClosedError, PyKvmError
from .fdobject import FdObject
from .ioctls import Ioctl

# One statistic: a u64, or the buckets of a histogram.
Value = int | tuple[int, ...]

_HEADER = struct.Struct("<6I")        # struct kvm_stats_header
# struct kvm_stats_desc without its name: flags, exponent, size, offset, bucket_size
_DESC = struct.Struct("<IhHII")
_FIELD_MASK = 0xF                     # type, unit and base are 4-bit fields of a descriptor's flags
_MAX_TABLE = 16 << 20                 # refuse absurd descriptor tables (a file that is not a stats fd)
_HISTOGRAMS = (StatsType.LINEAR_HIST, StatsType.LOG_HIST)
# Types whose values only grow, so that a difference over a block means something.
_DIFFERENCED = (StatsType.CUMULATIVE,) + _HISTOGRAMS
_NAMED_UNITS: dict[tuple[int, int], dict[int, str]] = {
    (StatsUnit.SECONDS, StatsBase.POW10): {0: "s", -3: "ms", -6: "us", -9: "ns"},
    (StatsUnit.BYTES, StatsBase.POW2): {0: "B", 10: "KiB", 20: "MiB", 30: "GiB"},
}


class StatsFormatError(PyKvmError, ValueError):
    """An fd given to :class:`Stats` does not hold KVM's binary statistics format."""


class UnknownStatistic(PyKvmError, KeyError):
    """A statistic name this VM / vCPU does not have (the message lists close matches)."""

    def __str__(self) -> str:          # KeyError would show the message in quotes
        return str(self.args[0]) if self.args else ""


class DeltaNotReady(PyKvmError):
    """A :class:`StatsDelta` used out of order: read before its block ended, never entered, or entered twice."""


@dataclasses.dataclass(frozen=True)
class StatsHeader:
    """``struct kvm_stats_header``: where the id, descriptors and data sit in the stats fd."""

    flags: int
    name_size: int
    num_desc: int
    id_offset: int
    desc_offset: int
    data_offset: int


@dataclasses.dataclass(frozen=True)
class StatDescriptor:
    """One statistic (``struct kvm_stats_desc``): its name, kind, unit and place in the data block.

    A value ``v`` read from the fd means ``v * scale`` of ``unit`` (e.g.
    ``halt_wait_ns`` is SECONDS with base 10 and exponent -9: nanoseconds).
    ``type``, ``unit`` and ``base`` are plain ints when the kernel uses a value
    newer than pykvm knows; ``flags`` keeps the raw field.
    """

    name: str
    type: StatsType | int
    unit: StatsUnit | int
    base: StatsBase | int
    exponent: int          # signed: the value is in units of base**exponent
    size: int              # number of u64 values: 1, or the buckets of a histogram
    offset: int            # byte offset in the data block
    bucket_size: int       # width of a linear histogram's buckets (0 otherwise)
    flags: int = 0

    @classmethod
    def unpack(cls, table: bytes, start: int, name_size: int) -> StatDescriptor:
        """Decode the descriptor at ``table[start:]`` (16 bytes, then a ``name_size``-byte name)."""
        flags, exponent, size, offset, bucket_size = _DESC.unpack_from(table, start)
        raw_name = table[start + _DESC.size:start + _DESC.size + name_size]
        name = raw_name.split(b"\0", 1)[0].decode("ascii", "replace")
        return cls(name=name,
                   type=as_enum(StatsType, (flags >> STATS_TYPE_SHIFT) & _FIELD_MASK),
                   unit=as_enum(StatsUnit, (flags >> STATS_UNIT_SHIFT) & _FIELD_MASK),
                   base=as_enum(StatsBase, (flags >> STATS_BASE_SHIFT) & _FIELD_MASK),
                   exponent=exponent, size=size, offset=offset, bucket_size=bucket_size,
                   flags=flags)

    @property
    def cumulative(self) -> bool:
        """A counter that only grows (a delta over a block is meaningful)."""
        return self.type == StatsType.CUMULATIVE

    @property
    def histogram(self) -> bool:
        """A linear or logarithmic histogram: ``size`` bucket counts."""
        return self.type in _HISTOGRAMS

    @property
    def scale(self) -> float | int:
        """``base ** exponent``: multiply a raw value by this to get it in ``unit``."""
        if self.base == StatsBase.POW10:
            radix = 10
        elif self.base == StatsBase.POW2:
            radix = 2
        else:
            raise ValueError(f"statistic {self.name!r} has exponent base {self.base}, which pykvm "
                             f"does not know (KVM_STATS_BASE_POW10 = 0 and POW2 = 1 exist)")
        return radix ** self.exponent

    @property
    def unit_label(self) -> str:
        """The unit in words: ``"ns"``, ``"KiB"``, ``"cycles"``, ``""`` for a plain count."""
        named = _NAMED_UNITS.get((self.unit, self.base), {})
        if self.exponent in named:
            return named[self.exponent]
        unit = self.unit.name.lower() if isinstance(self.unit, StatsUnit) else f"unit {self.unit}"
        if unit == "none":
            unit = ""
        if self.exponent == 0:
            return unit
        radix = {int(StatsBase.POW10): "10", int(StatsBase.POW2): "2"}.get(self.base, f"base{self.base}")
        return f"x{radix}^{self.exponent} {unit}".rstrip()

    def bucket_ranges(self) -> tuple[tuple[int, int | None], ...]:
        """Each histogram bucket's ``[low, high)`` in raw units; the last is ``(low, None)`` (no upper bound).

        Linear: bucket ``i`` is ``[i*bucket_size, (i+1)*bucket_size)``. Logarithmic
        (base 2): bucket 0 is ``[0, 1)``, bucket ``i`` is ``[2**(i-1), 2**i)``.
        """
        if self.type == StatsType.LINEAR_HIST:
            width = self.bucket_size
            bounds = [(i * width, (i + 1) * width) for i in range(self.size)]
        elif self.type == StatsType.LOG_HIST:
            bounds = [(0, 1)] + [(1 << (i - 1), 1 << i) for i in range(1, self.size)]
        else:
            raise ValueError(f"statistic {self.name!r} is not a histogram (type {self.kind})")
        ranges: list[tuple[int, int | None]] = list(bounds)
        ranges[-1] = (bounds[-1][0], None)
        return tuple(ranges)

    @property
    def kind(self) -> str:
        """The type in words: ``cumulative``, ``instant``, ``peak``, ``linear_hist``, ``log_hist``."""
        return self.type.name.lower() if isinstance(self.type, StatsType) else f"type {self.type}"

    def __repr__(self) -> str:
        unit = f" {self.unit_label}" if self.unit_label else ""
        shape = f" [{self.size} buckets]" if self.size != 1 else ""
        width = f" width={self.bucket_size}" if self.bucket_size else ""
        return f"StatDescriptor({self.name!r} {self.kind}{unit}{shape}{width} @{self.offset})"


def _close_matches(name: str, names: Iterable[str]) -> str:
    import difflib  # here: only a misspelt name pays for it

    close = difflib.get_close_matches(name, list(names), n=3, cutoff=0.5)
    return f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""


class Stats(FdObject):
    """A VM's or vCPU's stats fd: ``stats.read()``, ``stats["exits"]``, ``with stats.delta() as d:``.

    ``Stats(fd)`` takes ownership of any fd in the binary stats format (it is
    closed on error too); ``Stats.open(vm_or_vcpu)`` issues ``KVM_GET_STATS_FD``.
    """

    def __init__(self, fd: int, owner: Any = None) -> None:
        super().__init__(fd)
        if owner is None or isinstance(owner, str):
            self._owner = owner or ""
        else:
            self._owner = owner.describe()
        self.id = ""
        try:
            self.header = self._read_header(fd)
            self.id = self._read_id(fd)
            self.descriptors: dict[str, StatDescriptor] = self._read_descriptors(fd)
        except BaseException:
            self.close()
            raise
        self._data_size = max((d.offset + 8 * d.size for d in self.descriptors.values()), default=0)
        structs: dict[int, struct.Struct] = {}
        self._layout = [(d.name, structs.setdefault(d.size, struct.Struct(f"<{d.size}Q")).unpack_from,
                         d.offset, d.size == 1) for d in self.descriptors.values()]

    # -- construction ---------------------------------------------------------------
    @classmethod
    def open(cls, owner: Any) -> Stats:
        """``KVM_GET_STATS_FD`` on a :class:`~pykvm.Vm` or :class:`~pykvm.Vcpu`.

        Example::

            import pykvm
            from pykvm.core.stats import Stats
            with pykvm.Kvm() as kvm, kvm.create_vm() as vm, Stats.open(vm.create_vcpu()) as stats:
                assert stats.describe().startswith("Stats for Vcpu 0")
                assert stats["exits"] == 0               # a vCPU that never ran
        """
        vm = getattr(owner, "vm", owner)
        kvm = getattr(vm, "kvm", None)
        if kvm is None or not hasattr(owner, "_ioctl_value"):
            raise TypeError(f"Stats.open() takes a Vm or a Vcpu, not {type(owner).__name__}: "
                            f"KVM keeps statistics per VM and per vCPU (/dev/kvm itself has none)")
        owner._check_open()
        kvm.require(Cap.BINARY_STATS_FD,
                    f"statistics of {owner.describe()} (KVM_GET_STATS_FD, Linux 5.14 and later; "
                    f"older kernels only show them in /sys/kernel/debug/kvm)")
        fd = owner._ioctl_value(Ioctl.GET_STATS_FD, 0,
                                hint="the process may have run out of file descriptors")
        return cls(fd, owner)

    @staticmethod
    def _read_header(fd: int) -> StatsHeader:
        raw = os.pread(fd, _HEADER.size, 0)
        if len(raw) < _HEADER.size:
            raise StatsFormatError(
                f"fd {fd} is not a KVM stats fd: it holds {len(raw)} bytes where the "
                f"{_HEADER.size}-byte struct kvm_stats_header should be; pass the fd that "
                f"KVM_GET_STATS_FD returned, or use Stats.open(vm or vcpu)")
        header = StatsHeader(*_HEADER.unpack(raw))
        table = (_DESC.size + header.name_size) * header.num_desc
        if header.name_size == 0 or table > _MAX_TABLE:
            raise StatsFormatError(
                f"fd {fd} is not a KVM stats fd: its header says name_size={header.name_size}, "
                f"num_desc={header.num_desc} ({header}); pass the fd that KVM_GET_STATS_FD returned")
        return header

    def _read_id(self, fd: int) -> str:
        raw = os.pread(fd, self.header.name_size, self.header.id_offset)
        return raw.split(b"\0", 1)[0].decode("ascii", "replace")

    def _read_descriptors(self, fd: int) -> dict[str, StatDescriptor]:
        header = self.header
        stride = _DESC.size + header.name_size
        table = os.pread(fd, stride * header.num_desc, header.desc_offset)
        if len(table) != stride * header.num_desc:
            raise StatsFormatError(
                f"fd {fd}: the descriptor block is truncated: {header.num_desc} descriptors of "
                f"{stride} bytes need {stride * header.num_desc} bytes at offset "
                f"{header.desc_offset}, the file has {len(table)} there")
        descriptors: dict[str, StatDescriptor] = {}
        for index in range(header.num_desc):
            desc = StatDescriptor.unpack(table, index * stride, header.name_size)
            if desc.name in descriptors or not desc.name:
                raise StatsFormatError(f"fd {fd}: descriptor {index} has a duplicate or empty "
                                       f"name {desc.name!r}")
            if desc.size == 0:
                raise StatsFormatError(f"fd {fd}: statistic {desc.name!r} has size 0 (no values)")
            descriptors[desc.name] = desc
        return descriptors

    # -- identity -----------------------------------------------------------------------
    def describe(self) -> str:
        """``Stats for Vcpu 0 of Vm (fd 5)``, or ``Stats kvm-1234/vcpu-0 (fd 7)`` without an owner."""
        if self._owner:
            return f"Stats for {self._owner}"
        return f"Stats {self.id or '?'} (fd {self._fd})"

    def _check_open(self) -> None:
        if self._fd < 0:
            what = f"Stats for {self._owner}" if self._owner else f"Stats {self.id or ''}".rstrip()
            raise ClosedError(f"{what} is closed (by close() or with its Vm/Vcpu); statistics "
                              f"cannot be read after that: open them again on a live Vm or Vcpu")

    # -- reading ------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Every statistic's name, in the kernel's order.

        Example::

            import pykvm
            with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
                names = vm.create_vcpu().stats.names()
                assert {"exits", "halt_exits", "io_exits"} <= set(names)
        """
        return list(self.descriptors)

    def __contains__(self, name: object) -> bool:
        return name in self.descriptors

    def descriptor(self, name: str) -> StatDescriptor:
        """The descriptor of ``name``; :class:`UnknownStatistic` (a KeyError) naming close matches.

        Example::

            import pykvm
            with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
                wait = vm.create_vcpu().stats.descriptor("halt_wait_ns")
                assert wait.cumulative and wait.unit_label == "ns"
        """
        try:
            return self.descriptors[name]
        except KeyError:
            raise UnknownStatistic(
                f"{self.describe()} has no statistic {name!r}; {_close_matches(name, self.descriptors)}"
                f"stats.names() lists the {len(self.descriptors)} it has") from None

    def _read_block(self) -> bytes:
        self._check_open()
        data = os.pread(self._fd, self._data_size, self.header.data_offset)
        if len(data) != self._data_size:
            raise StatsFormatError(f"{self.describe()}: the data block is {len(data)} bytes, its "
                                   f"descriptors need {self._data_size}")
        return data

    def read(self) -> dict[str, Value]:
        """Every statistic now (one ``pread``): an int, or a tuple of bucket counts for a histogram.

        Example::

            import pykvm
            with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
                values = vm.create_vcpu().stats.read()
                assert values["exits"] == 0 and "halt_exits" in values
        """
        data = self._read_block()
        return {name: (unpack(data, offset)[0] if scalar else unpack(data, offset))
                for name, unpack, offset, scalar in self._layout}

    def __getitem__(self, name: str) -> Value:
        """One statistic now (a ``pread`` of just its values)."""
        desc = self.descriptor(name)
        self._check_open()
        raw = os.pread(self._fd, 8 * desc.size, self.header.data_offset + desc.offset)
        if len(raw) != 8 * desc.size:
            raise StatsFormatError(f"{self.describe()}: statistic {name!r} lies past the end of "
                                   f"the data block")
        values = struct.unpack(f"<{desc.size}Q", raw)
        return values[0] if desc.size == 1 else values

    def delta(self, *names: str) -> StatsDelta:
        """A context manager measuring what changes during its block: ``with stats.delta() as d:``.

        Reads every statistic (or only ``names``) on entry and on exit. Cumulative
        counters and histogram buckets give the difference; instant and peak values
        give their value at the end of the block.

        Example::

            import pykvm
            from pykvm import x86
            with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
                vcpu = vm.create_vcpu()
                x86.load_code(vcpu, "hlt", mode="real")
                with vcpu.stats.delta() as delta:
                    vcpu.run()
                assert delta["exits"] >= 1 and "exits" in delta.changed()
        """
        for name in names:
            self.descriptor(name)          # an unknown name fails now, not after the block
        return StatsDelta(self, tuple(names) or tuple(self.descriptors))


@dataclasses.dataclass(eq=False, repr=False)
class StatsDelta:
    """What a ``stats.delta()`` block did: ``d["exits"]``, ``d.get(name, 0)``, ``d.changed()``.

    ``start`` and ``end`` are the raw readings and ``seconds`` the block's wall time;
    the values exist only once the ``with`` block has ended (:class:`DeltaNotReady`
    before). If the block raises, the delta is still completed when the stats
    can be read, so an ``except`` clause can look at it.
    """

    stats: Stats
    names: tuple[str, ...]
    start: dict[str, Value] | None = None
    end: dict[str, Value] | None = None
    seconds: float | None = None
    _started_at: float = dataclasses.field(default=0.0, init=False)
    _values: dict[str, Value] | None = dataclasses.field(default=None, init=False)
    _failure: str = dataclasses.field(default="", init=False)

    # -- the with block -------------------------------------------------------------
    def __enter__(self) -> StatsDelta:
        if self.start is not None:
            raise DeltaNotReady(f"this delta of {self.stats.describe()} was already used; "
                                f"take a new one with stats.delta() for each block")
        self.start = self._snapshot()
        self._started_at = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        elapsed = time.perf_counter() - self._started_at
        try:
            end = self._snapshot()
        except (PyKvmError, OSError) as error:
            if exc_type is None:
                raise
            self._failure = str(error)       # keep the block's own exception; the delta stays unknown
            return
        self.end, self.seconds = end, elapsed
        self._values = {name: self._difference(name) for name in self.names}

    def _snapshot(self) -> dict[str, Value]:
        values = self.stats.read()
        return {name: values[name] for name in self.names}

    def _difference(self, name: str) -> Value:
        desc = self.stats.descriptors[name]
        assert self.start is not None and self.end is not None   # set by __enter__ / __exit__
        before, after = self.start[name], self.end[name]
        if desc.type not in _DIFFERENCED:
            return after
        if isinstance(after, tuple) and isinstance(before, tuple):
            return tuple(a - b for a, b in zip(after, before, strict=True))
        if isinstance(after, int) and isinstance(before, int):
            return after - before
        raise StatsFormatError(f"statistic {name!r} changed shape between two reads")

    # -- results --------------------------------------------------------------------------
    def _ready(self) -> dict[str, Value]:
        if self._values is None:
            if self._failure:
                state = f"its block raised and the end values could not be read ({self._failure})"
            elif self.start is not None:
                state = "its `with` block has not ended yet"
            else:
                state = "it was never entered with `with`"
            raise DeltaNotReady(f"the delta of {self.stats.describe()} is not known: {state}. "
                                f"Read it after the block (`with stats.delta() as d: ...` then "
                                f"d[name]); for current values inside the block use stats.read()")
        return self._values

    @property
    def ready(self) -> bool:
        """Whether the block has ended and the values can be read."""
        return self._values is not None

    def __getitem__(self, name: str) -> Value:
        values = self._ready()
        try:
            return values[name]
        except KeyError:
            pass
        if name in self.stats.descriptors:
            raise UnknownStatistic(
                f"this delta of {self.stats.describe()} tracks only {', '.join(values)} (the names "
                f"given to stats.delta()); add {name!r} there, or call stats.delta() with no "
                f"names to track every statistic")
        raise UnknownStatistic(
            f"{self.stats.describe()} has no statistic {name!r}; "
            f"{_close_matches(name, self.stats.descriptors)}stats.names() lists the "
            f"{len(self.stats.descriptors)} it has")

    def __contains__(self, name: object) -> bool:
        return name in self._ready()

    def get(self, name: str, default: Any = 0) -> Any:
        """The delta of ``name``, or ``default`` when it is not tracked (or not on this host)."""
        return self._ready().get(name, default)

    def items(self) -> ItemsView[str, Value]:
        """Every tracked statistic and its delta (or end value), in the kernel's order."""
        return self._ready().items()

    def as_dict(self) -> dict[str, Value]:
        return dict(self._ready())

    def changed(self) -> dict[str, Value]:
        """Only what changed: nonzero counter / bucket differences, and instant or peak
        values that differ between the start and the end (given as their end value)."""
        values = self._ready()
        assert self.start is not None and self.end is not None     # _ready() checked
        changed = {}
        for name, value in values.items():
            if self.stats.descriptors[name].type in _DIFFERENCED:
                moved = any(value) if isinstance(value, tuple) else value != 0
            else:
                moved = self.start[name] != self.end[name]
            if moved:
                changed[name] = value
        return changed

    def __repr__(self) -> str:
        owner = self.stats.describe() if not self.stats.closed else "closed Stats"
        if self._values is None:
            state = ("end not read" if self._failure else
                     "block not ended" if self.start is not None else "not entered")
            return f"<StatsDelta of {owner}: {state}>"
        changes = ", ".join(f"{name}={_signed(value, self.stats.descriptors[name])}"
                            for name, value in self.changed().items())
        return f"StatsDelta({owner}, {(self.seconds or 0.0) * 1e3:.3f} ms: {changes or 'no change'})"


def _signed(value: Value, desc: StatDescriptor) -> str:
    if desc.type not in _DIFFERENCED:
        return f"{value!r} (at end)"
    if isinstance(value, tuple):
        return "{" + ", ".join(f"bucket {i}: +{v}" for i, v in enumerate(value) if v) + "}"
    return f"{value:+d}"
