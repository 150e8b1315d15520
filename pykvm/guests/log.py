"""The guests' vector log: every vector a handler received, as it recorded it.

Why this exists: delivery is checked inside the guest. Each handler of the
packaged images appends a 64-byte record (vector, error code, interrupted
CS:RIP, RFLAGS, CR2, TSC, CPU) to a log in guest memory, laid out in
:mod:`pykvm.guests.layout`; this module decodes it.
"""

from __future__ import annotations

import dataclasses

from ..x86.modes import RFLAGS_IF
from ..x86.vectors import vector_name
from . import layout


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
        return vector_name(self.vector)

    @property
    def interrupts_were_enabled(self) -> bool:
        """RFLAGS.IF of the interrupted code."""
        return bool(self.rflags & RFLAGS_IF)

    def __repr__(self) -> str:
        extra = "".join([f" err={self.error_code:#x}" if self.error_code is not None else "",
                         f" cr2={self.cr2:#x}" if self.cr2 is not None else "",
                         " fixed-up" if self.fixed_up else ""])
        return (f"LogRecord(#{self.seq} {self.name} at {self.cs:#x}:{self.rip:#x} "
                f"rflags={self.rflags:#x}{extra} cpu={self.cpu})")


def parse_record(raw: bytes) -> LogRecord:
    """Decode one ``LOG_RECORD_SIZE``-byte record (layout in :mod:`pykvm.guests.layout`)."""
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
