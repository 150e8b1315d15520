"""Binary statistics (KVM_GET_STATS_FD): parsing a synthetic stats file, then the real thing.

The unit tests build a stats file byte by byte in the kernel's format
(Documentation/virt/kvm/api.rst, "KVM_GET_STATS_FD"), with the kernel's flag
values written as literals, so the decoder is checked against the ABI rather
than against pykvm's own constants. The hardware tests open the stats fd of a
real VM and vCPU and count the exits a booted guest makes.
"""

from __future__ import annotations

import os
import re
import struct

import psutil
import pytest

import pykvm
from pykvm.core.constants import Cap, StatsBase, StatsType, StatsUnit
from pykvm.core.errors import CapabilityMissing, ClosedError, PyKvmError
from pykvm.core.stats import (
    DeltaNotReady,
    StatDescriptor,
    Stats,
    StatsDelta,
    StatsFormatError,
    UnknownStatistic,
)
from pykvm.guests import Command
from pykvm.hosts.vendor import VendorModule

# The kernel's flag bits (include/uapi/linux/kvm.h), spelled out on purpose.
TYPE_CUMULATIVE, TYPE_INSTANT, TYPE_PEAK, TYPE_LINEAR_HIST, TYPE_LOG_HIST = 0x0, 0x1, 0x2, 0x3, 0x4
UNIT_NONE, UNIT_BYTES, UNIT_SECONDS, UNIT_CYCLES, UNIT_BOOLEAN = 0x00, 0x10, 0x20, 0x30, 0x40
BASE_POW10, BASE_POW2 = 0x000, 0x100
NAME_SIZE = 48                       # KVM_STATS_NAME_SIZE
HEADER_SIZE, DESC_SIZE = 24, 16      # sizeof(struct kvm_stats_header), sizeof(struct kvm_stats_desc)

# name, flags, exponent, size, data offset, bucket_size. Offsets deliberately out
# of order at the end, as the real x86 VM stats have them (max_mmu_* at 112 / 104).
FAKE_STATS = [
    ("exits", TYPE_CUMULATIVE | UNIT_NONE | BASE_POW10, 0, 1, 0, 0),
    ("io_exits", TYPE_CUMULATIVE | UNIT_NONE | BASE_POW10, 0, 1, 8, 0),
    ("halt_wait_ns", TYPE_CUMULATIVE | UNIT_SECONDS | BASE_POW10, -9, 1, 16, 0),
    ("blocking", TYPE_INSTANT | UNIT_BOOLEAN | BASE_POW10, 0, 1, 24, 0),
    ("halt_wait_hist", TYPE_LOG_HIST | UNIT_SECONDS | BASE_POW10, -9, 4, 32, 0),
    ("queue_depth_hist", TYPE_LINEAR_HIST | UNIT_NONE | BASE_POW10, 0, 3, 64, 10),
    ("guest_memory", TYPE_INSTANT | UNIT_BYTES | BASE_POW2, 10, 1, 88, 0),
    ("tsc_cycles", TYPE_CUMULATIVE | UNIT_CYCLES | BASE_POW10, 0, 1, 96, 0),
    ("max_rmap_size", TYPE_PEAK | UNIT_NONE | BASE_POW10, 0, 1, 112, 0),
    ("max_hash_collisions", TYPE_PEAK | UNIT_NONE | BASE_POW10, 0, 1, 104, 0),
]
FAKE_VALUES = {"exits": 1000, "io_exits": 400, "halt_wait_ns": 5_000_000_000, "blocking": 0,
               "halt_wait_hist": (1, 2, 3, 4), "queue_depth_hist": (7, 8, 9),
               "guest_memory": 16384, "tsc_cycles": 2**63 + 5, "max_rmap_size": 12,
               "max_hash_collisions": 3}


class FakeStatsFile:
    """A file laid out exactly like a stats fd: header, id, descriptors, data."""

    def __init__(self, path, stats=FAKE_STATS, values=FAKE_VALUES, stats_id="kvm-42/vcpu-3",
                 name_size=NAME_SIZE):
        self.path = str(path)
        self.stats = {entry[0]: entry for entry in stats}
        id_offset = HEADER_SIZE
        desc_offset = id_offset + name_size
        self.data_offset = desc_offset + len(stats) * (DESC_SIZE + name_size)
        blob = struct.pack("<6I", 0, name_size, len(stats), id_offset, desc_offset, self.data_offset)
        blob += stats_id.encode().ljust(name_size, b"\0")
        for name, flags, exponent, size, offset, bucket_size in stats:
            blob += struct.pack("<IhHII", flags, exponent, size, offset, bucket_size)
            blob += name.encode().ljust(name_size, b"\0")
        data_size = max(offset + 8 * size for _, _, _, size, offset, _ in stats)
        blob += bytes(data_size)
        with open(self.path, "wb") as file:
            file.write(blob)
        for name, value in values.items():
            self.set(name, value)

    def set(self, name, value):
        """What KVM does when it counts: overwrite the statistic's u64 values in place."""
        _, _, _, size, offset, _ = self.stats[name]
        values = value if isinstance(value, tuple) else (value,)
        assert len(values) == size
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.pwrite(fd, struct.pack(f"<{size}Q", *values), self.data_offset + offset)
        finally:
            os.close(fd)

    def open(self, owner=None) -> Stats:
        return Stats(os.open(self.path, os.O_RDONLY | os.O_CLOEXEC), owner)


@pytest.fixture
def fake(tmp_path):
    return FakeStatsFile(tmp_path / "stats")


@pytest.fixture
def stats(fake):
    with fake.open() as stats:
        yield stats


# -- parsing ---------------------------------------------------------------------------

def test_header_id_and_descriptors_are_parsed(stats):
    header = stats.header
    assert (header.flags, header.name_size, header.num_desc) == (0, NAME_SIZE, len(FAKE_STATS))
    assert header.id_offset == HEADER_SIZE and header.desc_offset == HEADER_SIZE + NAME_SIZE
    assert header.data_offset == header.desc_offset + len(FAKE_STATS) * (DESC_SIZE + NAME_SIZE)
    assert stats.id == "kvm-42/vcpu-3"
    assert stats.names() == [entry[0] for entry in FAKE_STATS]   # the kernel's order
    assert "exits" in stats and "exit" not in stats
    exits = stats.descriptors["exits"]
    assert exits == StatDescriptor("exits", StatsType.CUMULATIVE, StatsUnit.NONE, StatsBase.POW10,
                                   exponent=0, size=1, offset=0, bucket_size=0, flags=0)
    assert exits.cumulative and not exits.histogram
    hist = stats.descriptors["queue_depth_hist"]
    assert (hist.type, hist.size, hist.offset, hist.bucket_size) == (StatsType.LINEAR_HIST, 3, 64, 10)
    assert hist.histogram and not hist.cumulative
    assert stats.descriptors["max_rmap_size"].type == StatsType.PEAK
    assert "exits" in repr(exits) and "cumulative" in repr(exits)


def test_exponent_unit_and_base_are_decoded(stats):
    ns = stats.descriptors["halt_wait_ns"]
    assert (ns.type, ns.unit, ns.base, ns.exponent) == (StatsType.CUMULATIVE, StatsUnit.SECONDS,
                                                        StatsBase.POW10, -9)   # signed 16-bit
    assert ns.scale == pytest.approx(1e-9) and ns.unit_label == "ns"
    assert ns.flags == UNIT_SECONDS
    memory = stats.descriptors["guest_memory"]
    assert (memory.type, memory.unit, memory.base, memory.exponent) == (
        StatsType.INSTANT, StatsUnit.BYTES, StatsBase.POW2, 10)
    assert memory.scale == 1024 and memory.unit_label == "KiB"
    assert stats["guest_memory"] * memory.scale == 16 << 20
    assert stats.descriptors["tsc_cycles"].unit == StatsUnit.CYCLES
    assert stats.descriptors["tsc_cycles"].unit_label == "cycles"
    assert stats.descriptors["blocking"].unit == StatsUnit.BOOLEAN
    assert stats.descriptors["exits"].unit_label == ""
    assert stats.descriptors["halt_wait_hist"].unit_label == "ns"


def test_kinds_newer_than_pykvm_are_kept_as_numbers(tmp_path):
    entries = [("future", 0x7 | 0x90 | 0x200, -3, 1, 0, 0)]
    with FakeStatsFile(tmp_path / "stats", entries, {"future": 5}).open() as stats:
        future = stats.descriptors["future"]
        assert (future.type, future.unit, future.base, future.exponent) == (7, 9, 2, -3)
        assert stats.read() == {"future": 5}
        assert "type 7" in repr(future)
        with pytest.raises(ValueError, match="base"):
            future.scale
        with stats.delta() as delta:          # an unknown type is not differenced
            pass
        assert delta["future"] == 5


def test_read_gives_scalars_and_histogram_tuples(stats):
    values = stats.read()
    assert values == FAKE_VALUES
    assert isinstance(values["exits"], int) and values["halt_wait_hist"] == (1, 2, 3, 4)
    assert values["tsc_cycles"] == 2**63 + 5                    # u64, not signed
    assert stats["max_hash_collisions"] == 3 and stats["max_rmap_size"] == 12   # offsets out of order
    assert stats["queue_depth_hist"] == (7, 8, 9)


def test_read_sees_new_values(fake, stats):
    fake.set("exits", 1234)
    fake.set("halt_wait_hist", (0, 0, 0, 9))
    assert stats["exits"] == 1234
    assert stats.read()["halt_wait_hist"] == (0, 0, 0, 9)


def test_histogram_bucket_ranges(stats):
    assert stats.descriptors["queue_depth_hist"].bucket_ranges() == ((0, 10), (10, 20), (20, None))
    assert stats.descriptors["halt_wait_hist"].bucket_ranges() == ((0, 1), (1, 2), (2, 4), (4, None))
    with pytest.raises(ValueError, match="not a histogram"):
        stats.descriptors["exits"].bucket_ranges()


def test_unknown_name_names_close_matches_and_how_to_list(stats):
    with pytest.raises(UnknownStatistic) as info:
        stats["exit"]
    assert isinstance(info.value, KeyError) and isinstance(info.value, PyKvmError)
    message = str(info.value)
    assert "'exit'" in message and "'exits'" in message and "stats.names()" in message
    assert "kvm-42/vcpu-3" in message
    with pytest.raises(KeyError, match="no statistic 'zzzz'; stats.names"):
        stats["zzzz"]
    with pytest.raises(UnknownStatistic, match="did you mean 'io_exits'"):
        stats.delta("io_exit")           # refused before the block runs


def test_describe_names_the_owner_or_the_id(fake):
    with fake.open() as stats:
        assert re.fullmatch(r"Stats kvm-42/vcpu-3 \(fd \d+\)", stats.describe())
        assert repr(stats).startswith("<Stats kvm-42/vcpu-3")
    with fake.open("Vcpu 3 of Vm (fd 9)") as stats:
        assert stats.describe() == "Stats for Vcpu 3 of Vm (fd 9)"
    assert "closed" in repr(stats)


# -- deltas ------------------------------------------------------------------------------

def test_delta_differences_counters_and_reports_instant_and_peak_at_the_end(fake, stats):
    with stats.delta() as delta:
        fake.set("exits", 1010)
        fake.set("io_exits", 403)
        fake.set("blocking", 1)
        fake.set("max_rmap_size", 20)
        fake.set("halt_wait_hist", (1, 2, 5, 4))
        fake.set("guest_memory", 16384)              # instant, unchanged
    assert isinstance(delta, StatsDelta) and delta.ready
    assert delta["exits"] == 10 and delta["io_exits"] == 3
    assert delta["halt_wait_ns"] == 0
    assert delta["blocking"] == 1                     # instant: the value at the end
    assert delta["max_rmap_size"] == 20               # peak: the value at the end
    assert delta["guest_memory"] == 16384
    assert delta["halt_wait_hist"] == (0, 0, 2, 0)    # buckets are counts: differenced
    assert delta.changed() == {"exits": 10, "io_exits": 3, "blocking": 1,
                               "halt_wait_hist": (0, 0, 2, 0), "max_rmap_size": 20}
    assert delta.get("exits") == 10 and delta.get("no_such_stat") == 0
    assert delta.get("no_such_stat", None) is None
    assert [name for name, _ in delta.items()] == stats.names()
    assert delta.as_dict()["tsc_cycles"] == 0
    assert delta.start["exits"] == 1000 and delta.end["exits"] == 1010
    assert delta.seconds is not None and delta.seconds >= 0
    text = repr(delta)
    assert text.startswith("StatsDelta(Stats kvm-42/vcpu-3") and "exits=+10" in text
    assert "blocking=1 (at end)" in text and "bucket 2: +2" in text and "guest_memory" not in text


def test_delta_of_named_statistics_only(fake, stats):
    with stats.delta("exits", "blocking") as delta:
        fake.set("exits", 1001)
        fake.set("io_exits", 401)
    assert delta.as_dict() == {"exits": 1, "blocking": 0}
    assert delta.changed() == {"exits": 1}
    assert delta.get("io_exits") == 0
    with pytest.raises(UnknownStatistic, match="tracks only exits, blocking"):
        delta["io_exits"]
    with pytest.raises(UnknownStatistic, match="no statistic 'exitz'; did you mean 'exits'"):
        delta["exitz"]


def test_unchanged_block_says_so(stats):
    with stats.delta() as delta:
        pass
    assert delta.changed() == {} and "no change" in repr(delta)


def test_reading_a_delta_before_its_block_ends_is_refused(stats):
    with stats.delta() as delta:
        assert not delta.ready
        with pytest.raises(DeltaNotReady, match="has not ended"):
            delta["exits"]
        with pytest.raises(DeltaNotReady):
            delta.changed()
        assert "block not ended" in repr(delta)
    assert delta["exits"] == 0
    unused = stats.delta()
    with pytest.raises(DeltaNotReady, match="never entered"):
        unused.get("exits")
    with pytest.raises(DeltaNotReady, match="already used"):
        with delta:
            pass


def test_delta_is_completed_when_the_block_raises(fake, stats):
    with pytest.raises(RuntimeError):
        with stats.delta() as delta:
            fake.set("exits", 1005)
            raise RuntimeError("guest failed")
    assert delta["exits"] == 5


def test_block_exception_wins_when_the_stats_were_closed_inside_it(stats):
    with pytest.raises(RuntimeError):
        with stats.delta() as delta:
            stats.close()
            raise RuntimeError("guest failed")
    assert not delta.ready
    with pytest.raises(DeltaNotReady, match="block raised and the end values could not be read"):
        delta["exits"]


def test_closing_inside_a_block_is_reported(stats):
    with pytest.raises(ClosedError, match="is closed"):
        with stats.delta():
            stats.close()


# -- lifecycle ---------------------------------------------------------------------------

def test_closed_stats_raise_closed_error(fake):
    stats = fake.open()
    stats.close()
    stats.close()                                     # idempotent
    assert stats.closed
    for use in (stats.read, lambda: stats["exits"], lambda: stats.delta().__enter__(),
                lambda: stats.fd):
        with pytest.raises(ClosedError, match="closed"):
            use()
    assert stats.names() == [entry[0] for entry in FAKE_STATS]   # descriptors stay known
    with fake.open() as stats:
        pass
    assert stats.closed


def test_malformed_files_are_refused_and_their_fd_closed(tmp_path):
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    no_names = tmp_path / "no_names"
    no_names.write_bytes(struct.pack("<6I", 0, 0, 1, 24, 24, 40))
    truncated = tmp_path / "truncated"
    truncated.write_bytes(struct.pack("<6I", 0, NAME_SIZE, 3, 24, 72, 264) + bytes(NAME_SIZE + 20))
    process = psutil.Process()
    before = process.num_fds()
    for path, message in ((empty, "not a KVM stats fd"), (no_names, "name_size=0"),
                          (truncated, "truncated")):
        with pytest.raises(StatsFormatError, match=message):
            Stats(os.open(path, os.O_RDONLY))
    assert process.num_fds() == before


def test_short_data_block_is_reported(fake, stats):
    os.truncate(fake.path, fake.data_offset + 16)
    with pytest.raises(StatsFormatError, match="data block"):
        stats.read()


def test_no_fd_leak(fake):
    process = psutil.Process()
    before = process.num_fds()
    for _ in range(50):
        with fake.open() as stats:
            with stats.delta() as delta:
                stats.read()
        assert delta["exits"] == 0
    for _ in range(10):
        fake.open().close()
    assert process.num_fds() == before


def test_open_wants_a_vm_or_vcpu():
    with pytest.raises(TypeError, match="Vm or a Vcpu"):
        Stats.open(object())


# -- on a real /dev/kvm --------------------------------------------------------------------

def test_ids_name_the_process_and_the_vcpu(vm):
    vcpus = [vm.create_vcpu(), vm.create_vcpu()]
    with Stats.open(vm) as vm_stats:
        assert vm_stats.id == f"kvm-{os.getpid()}"
        assert vm_stats.describe() == f"Stats for Vm (fd {vm.fd})"
    for vcpu in vcpus:
        with Stats.open(vcpu) as stats:
            assert re.fullmatch(r"kvm-\d+/vcpu-\d+", stats.id)
            assert stats.id == f"kvm-{os.getpid()}/vcpu-{vcpu.id}"
            assert stats.describe() == f"Stats for Vcpu {vcpu.id} of Vm (fd {vm.fd})"


def _check_layout(stats: Stats) -> dict:
    values = stats.read()
    assert stats.header.flags == 0 and stats.header.name_size >= 32
    for name, desc in stats.descriptors.items():
        assert isinstance(desc.type, StatsType), desc
        assert isinstance(desc.unit, StatsUnit), desc
        assert isinstance(desc.base, StatsBase), desc
        assert desc.offset % 8 == 0
        value = values[name]
        assert (value >= 0) if desc.size == 1 else (len(value) == desc.size and min(value) >= 0)
    return values


def test_vm_stats_have_the_generic_vm_counters(vm):
    with Stats.open(vm) as stats:
        _check_layout(stats)
        # Generic to every KVM with binary stats (struct kvm_vm_stat_generic).
        for name in ("remote_tlb_flush", "remote_tlb_flush_requests"):
            assert stats.descriptors[name].cumulative
        assert stats.descriptors["pages_4k"].type == StatsType.INSTANT     # x86 MMU
        assert stats.descriptors["max_mmu_page_hash_collisions"].type == StatsType.PEAK


def test_vcpu_stats_have_exit_counters_and_halt_histograms(vcpu):
    with Stats.open(vcpu) as stats:
        values = _check_layout(stats)
        for name in ("exits", "io_exits", "halt_exits", "signal_exits", "irq_injections",
                     "insn_emulation"):
            assert stats.descriptors[name].cumulative, name
        wait = stats.descriptors["halt_wait_ns"]
        assert (wait.unit, wait.base, wait.exponent, wait.unit_label) == (
            StatsUnit.SECONDS, StatsBase.POW10, -9, "ns")
        hist = stats.descriptors["halt_wait_hist"]
        assert hist.type == StatsType.LOG_HIST and hist.size > 1 and hist.unit == StatsUnit.SECONDS
        assert len(values["halt_wait_hist"]) == hist.size
        assert stats.descriptors["blocking"].unit == StatsUnit.BOOLEAN
        assert values["exits"] == 0                       # never ran


def test_nop_commands_are_counted_as_exits(boot, host):
    guest = boot("long")                 # stopped at its first sync point
    commands = 40
    with Stats.open(guest.vcpu) as stats:
        stops_before = len(guest.stops)
        with stats.delta() as delta:
            for _ in range(commands):
                guest.command(Command.NOP)
        userspace_exits = guest.stops[stops_before:]
        # Each NOP command is one `out` to PORT_SYNC, so exactly one exit to userspace.
        assert len(userspace_exits) == commands
        assert all(isinstance(stop.exit, pykvm.IoExit) for stop in userspace_exits)
        # `exits` counts every VM exit, handled in the kernel or not (x86.c, vcpu_enter_guest).
        assert delta["exits"] >= commands
        if host.vendor == VendorModule.PVM:
            # Measured on kvm_pvm: its `out` exits are not counted in io_exits at all.
            assert delta["io_exits"] == 0
        else:
            # Expected from KVM's vmx.c handle_io / svm.c io_interception (one per port I/O exit).
            assert delta["io_exits"] == commands
        assert delta["halt_exits"] == 0 and delta["irq_injections"] == 0
        assert delta.end["exits"] == stats["exits"]       # nothing ran since


def test_vm_and_vcpu_deltas_nest(boot, vm):
    guest = boot("long")
    with Stats.open(vm) as vm_stats, Stats.open(guest.vcpu) as vcpu_stats:
        with vm_stats.delta() as vm_delta, vcpu_stats.delta("exits") as vcpu_delta:
            guest.command(Command.NOP)
        assert vcpu_delta["exits"] >= 1
        assert all(value >= 0 for name, value in vm_delta.items()
                   if vm_stats.descriptors[name].cumulative)


def test_a_delta_is_cheap_enough_to_wrap_any_block(vcpu, monkeypatch):
    # Cheap by construction (speed figures belong in benchmarks, not in timed tests): a delta
    # reads the data block once on entry and once on exit, never the header or the descriptors.
    reads: list[tuple[int, int]] = []
    real_pread = os.pread

    def counting_pread(fd: int, size: int, offset: int) -> bytes:
        reads.append((size, offset))
        return real_pread(fd, size, offset)

    with Stats.open(vcpu) as stats:
        monkeypatch.setattr("pykvm.core.stats.os.pread", counting_pread)
        with stats.delta() as delta:
            pass
        monkeypatch.undo()
        block = (stats._data_size, stats.header.data_offset)
    assert reads == [block, block]
    assert delta and all(value == 0 for name, value in delta.items() if name == "exits")


def test_open_checks_the_capability(vcpu, monkeypatch):
    kvm = vcpu.vm.kvm
    real = kvm.check_extension
    monkeypatch.setattr(kvm, "check_extension",
                        lambda cap: 0 if cap == Cap.BINARY_STATS_FD else real(cap))
    before = psutil.Process().num_fds()
    with pytest.raises(CapabilityMissing, match="KVM_CAP_BINARY_STATS_FD") as info:
        Stats.open(vcpu)
    assert "Vcpu 0" in str(info.value)
    assert psutil.Process().num_fds() == before


def test_open_refuses_closed_owners_and_kvm(kvm):
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu()
    vm.close()
    with pytest.raises(ClosedError):
        Stats.open(vcpu)
    with pytest.raises(ClosedError):
        Stats.open(vm)
    with pytest.raises(TypeError, match="/dev/kvm itself has none"):
        Stats.open(kvm)


def test_stats_fds_do_not_leak(vm):
    vcpu = vm.create_vcpu()
    process = psutil.Process()
    before = process.num_fds()
    for _ in range(50):
        with Stats.open(vcpu) as stats:
            stats.read()
        Stats.open(vm).close()
    assert process.num_fds() == before
