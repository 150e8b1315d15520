"""Decoding the guests' vector log (no KVM needed)."""

import struct

from pykvm.guests import layout, parse_log, parse_record


def make_record(seq, vector, rip, error_code=None, cr2=None, cs=0x18, rflags=0x202, tsc=1234,
                rsp=0xEFF0, cpu=0, fixup=False):
    flags = ((layout.REC_FLAG_ERROR_CODE if error_code is not None else 0)
             | (layout.REC_FLAG_CR2 if cr2 is not None else 0)
             | (layout.REC_FLAG_FIXUP if fixup else 0))
    raw = bytearray(layout.LOG_RECORD_SIZE)
    struct.pack_into("<IHHII", raw, 0, seq, vector, cs, error_code or 0, flags)
    struct.pack_into("<QQQQQI", raw, layout.REC_RIP, rip, rflags, tsc, cr2 or 0, rsp, cpu)
    return bytes(raw)


def make_log(records, capacity=layout.LOG_CAPACITY, count=None):
    raw = bytearray(layout.LOG_HEADER_SIZE + capacity * layout.LOG_RECORD_SIZE)
    struct.pack_into("<II", raw, 0, len(records) if count is None else count, capacity)
    for record in records:
        seq = struct.unpack_from("<I", record)[0]
        start = layout.LOG_HEADER_SIZE + (seq % capacity) * layout.LOG_RECORD_SIZE
        raw[start:start + layout.LOG_RECORD_SIZE] = record
    return bytes(raw)


def test_record_fields():
    record = parse_record(make_record(7, 14, 0x10042, error_code=2, cr2=0x123456000, fixup=True))
    assert (record.seq, record.vector, record.rip, record.cs) == (7, 14, 0x10042, 0x18)
    assert record.error_code == 2 and record.cr2 == 0x123456000 and record.fixed_up
    assert record.name == "#PF (14)"
    assert record.interrupts_were_enabled


def test_absent_error_code_and_cr2_are_none():
    record = parse_record(make_record(0, 0x40, 0x1000, rflags=0x2))
    assert record.error_code is None and record.cr2 is None
    assert not record.interrupts_were_enabled
    assert record.name == "vector 0x40"


def test_log_in_order():
    records = [make_record(i, 0x20 + i, 0x10000 + i) for i in range(5)]
    parsed = parse_log(make_log(records))
    assert [r.vector for r in parsed] == [0x20, 0x21, 0x22, 0x23, 0x24]
    assert [r.seq for r in parsed] == list(range(5))


def test_log_wraps_keeping_the_newest():
    capacity = 4
    records = [make_record(i, 0x30 + i, 0x10000 + i) for i in range(6)]
    parsed = parse_log(make_log(records[2:], capacity=capacity, count=6))
    assert [r.seq for r in parsed] == [2, 3, 4, 5]


def test_empty_log():
    assert parse_log(make_log([])) == []
