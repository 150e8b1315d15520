"""KVM's binary statistics (``KVM_GET_STATS_FD``) as names and numbers.

Why this exists: how many exits, injections and halts a delivery path costs is
the lesson of the in-kernel irqchip, and KVM counts them per VM and per vCPU.
The stats fd holds a header, an id string, one descriptor per statistic and
a data block (Documentation/virt/kvm/api.rst, "KVM_GET_STATS_FD"). This module
parses the descriptors once, reads the data block with one ``pread`` and
gives counter differences over a block of code with ``stats.delta()``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import struct
from typing import Iterator

from .constants import (STATS_BASE_SHIFT, STATS_TYPE_SHIFT, STATS_UNIT_SHIFT, Cap, StatsBase,
                        StatsType, StatsUnit)
from .errors import PyKvmError
from .fdobject import FdObject
from .ioctls import Ioctl

_HEADER = struct.Struct("<6I")        # flags, name_size, num_desc, id_offset, desc_offset, data_offset
_DESCRIPTOR = struct.Struct("<IhHII")  # flags, exponent, size, offset, bucket_size; then the name


@dataclasses.dataclass(frozen=True)
class StatDescriptor:
    """One statistic: its name, kind, unit and where its value sits in the data block."""

    name: str
    type: StatsType
    unit: StatsUnit
    base: StatsBase
    exponent: int
    size: int          # number of u64 values (1, or the buckets of a histogram)
    offset: int        # byte offset in the data block
    bucket_size: int

    @classmethod
    def parse(cls, raw: bytes, name_size: int) -> "StatDescriptor":
        flags, exponent, size, offset, bucket_size = _DESCRIPTOR.unpack_from(raw)
        name = raw[_DESCRIPTOR.size:_DESCRIPTOR.size + name_size].split(b"\0", 1)[0].decode()

        def field(enum_type, shift: int):
            value = (flags >> shift) & 0xF
            try:
                return enum_type(value)
            except ValueError:
                return value
        return cls(name, field(StatsType, STATS_TYPE_SHIFT), field(StatsUnit, STATS_UNIT_SHIFT),
                   field(StatsBase, STATS_BASE_SHIFT), exponent, size, offset, bucket_size)

    @property
    def cumulative(self) -> bool:
        return self.type == StatsType.CUMULATIVE


class Stats(FdObject):
    """A stats fd of a VM or vCPU. ``stats.read()``, ``stats["exits"]``, ``with stats.delta() as d:``."""

    def __init__(self, fd: int, owner: str = "") -> None:
        super().__init__(fd)
        self._owner = owner
        try:
            header = os.pread(fd, _HEADER.size, 0)
            if len(header) != _HEADER.size:
                raise PyKvmError(f"fd {fd} is not a KVM stats fd: its header is {len(header)} bytes")
            _, name_size, count, id_offset, desc_offset, self._data_offset = _HEADER.unpack(header)
            self.id = os.pread(fd, name_size, id_offset).split(b"\0", 1)[0].decode()
            stride = _DESCRIPTOR.size + name_size
            table = os.pread(fd, stride * count, desc_offset)
            descriptors = [StatDescriptor.parse(table[i * stride:(i + 1) * stride], name_size)
                           for i in range(count)]
        except BaseException:
            self.close()
            raise
        self.descriptors: dict[str, StatDescriptor] = {d.name: d for d in descriptors}
        self._data_size = max((d.offset + 8 * d.size for d in descriptors), default=0)

    @classmethod
    def open(cls, owner) -> "Stats":
        """``KVM_GET_STATS_FD`` on a Vm or Vcpu."""
        kvm = owner.kvm if hasattr(owner, "kvm") else owner.vm.kvm
        kvm.require(Cap.BINARY_STATS_FD, "statistics (vm.stats / vcpu.stats)")
        fd = owner._ioctl_value(Ioctl.GET_STATS_FD, 0)
        return cls(fd, owner.describe())

    def describe(self) -> str:
        return f"Stats for {self._owner or f'fd {self._fd}'}"

    def names(self) -> list[str]:
        return list(self.descriptors)

    def read(self) -> dict[str, int | tuple[int, ...]]:
        """Every statistic now: an int, or a tuple of bucket counts for a histogram."""
        self._check_open()
        data = os.pread(self._fd, self._data_size, self._data_offset)
        values: dict[str, int | tuple[int, ...]] = {}
        for name, desc in self.descriptors.items():
            numbers = struct.unpack_from(f"<{desc.size}Q", data, desc.offset)
            values[name] = numbers[0] if desc.size == 1 else numbers
        return values

    def __getitem__(self, name: str) -> int | tuple[int, ...]:
        desc = self.descriptors.get(name)
        if desc is None:
            close = difflib.get_close_matches(name, self.descriptors, n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise KeyError(f"{self.describe()} has no statistic {name!r}; {hint}"
                           f"stats.names() lists the {len(self.descriptors)} it has")
        self._check_open()
        numbers = struct.unpack(f"<{desc.size}Q",
                                os.pread(self._fd, 8 * desc.size, self._data_offset + desc.offset))
        return numbers[0] if desc.size == 1 else numbers

    @contextlib.contextmanager
    def delta(self) -> Iterator["StatsDelta"]:
        """Counter differences over the ``with`` block (instant and peak values: their value at the end)."""
        result = StatsDelta(self.descriptors)
        before = self.read()
        yield result
        result._finish(before, self.read())


class StatsDelta:
    """What changed during a ``stats.delta()`` block; readable once the block has ended."""

    def __init__(self, descriptors: dict[str, StatDescriptor]) -> None:
        self._descriptors = descriptors
        self._values: dict[str, int] | None = None

    def _finish(self, before: dict, after: dict) -> None:
        values = {}
        for name, desc in self._descriptors.items():
            if desc.size != 1:
                continue
            values[name] = after[name] - before[name] if desc.cumulative else after[name]
        self._values = values

    def _check(self) -> dict[str, int]:
        if self._values is None:
            raise PyKvmError("the stats delta is known only after its `with` block has ended")
        return self._values

    def __getitem__(self, name: str) -> int:
        values = self._check()
        if name not in values:
            close = difflib.get_close_matches(name, values, n=3)
            raise KeyError(f"no statistic {name!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
        return values[name]

    def get(self, name: str, default: int = 0) -> int:
        return self._check().get(name, default)

    def items(self):
        return self._check().items()

    def changed(self) -> dict[str, int]:
        """The statistics whose delta (or end value) is not zero."""
        return {name: value for name, value in self._check().items() if value}

    def __repr__(self) -> str:
        if self._values is None:
            return "<StatsDelta (block not finished)>"
        return "StatsDelta(" + ", ".join(f"{k}={v}" for k, v in self.changed().items()) + ")"
