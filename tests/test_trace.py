"""pykvm.runtime.trace: format and trace-text parsing on a synthetic tracefs, then real events on KVM.

The unit tests write format files and trace text in the kernel's layout into
tmp_path (the text as the ``fields`` option prints it) and drive
``trace.record`` through a synthetic :class:`Tracefs` that behaves like the
kernel's: ``mkdir`` of an instance creates its control files, ``rmdir``
removes it whole. The hardware tests record kvm events of this process.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import pykvm
from pykvm import x86
from pykvm.core.interrupts import MsiMessage
from pykvm.runtime import trace

PIO_FORMAT = """name: kvm_pio
ID: 45
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:unsigned int rw;\toffset:8;\tsize:4;\tsigned:0;
\tfield:unsigned int port;\toffset:12;\tsize:4;\tsigned:0;
\tfield:unsigned int size;\toffset:16;\tsize:4;\tsigned:0;
\tfield:unsigned int count;\toffset:20;\tsize:4;\tsigned:0;
\tfield:unsigned int val;\toffset:24;\tsize:4;\tsigned:0;

print fmt: "pio_%s at 0x%x size %d count %d val 0x%x %s", REC->rw ? "write" : "read", REC->port
"""
EXIT_FORMAT = """name: kvm_userspace_exit
ID: 42
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:__u32 reason;\toffset:8;\tsize:4;\tsigned:0;
\tfield:int errno;\toffset:12;\tsize:4;\tsigned:1;

print fmt: "reason %s (%d)", REC->reason
"""
PAGE_FORMAT = """name: kvm_mmu_get_page
ID: 99
format:
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:__u8 mmu_valid_gen;\toffset:8;\tsize:1;\tsigned:0;
\tfield:__u64 gfn;\toffset:16;\tsize:8;\tsigned:0;
\tfield:__s8 shift;\toffset:24;\tsize:1;\tsigned:1;
\tfield:char comm[16];\toffset:25;\tsize:16;\tsigned:0;

print fmt: "x"
"""
HEADER = """# tracer: nop
#
#           TASK-PID       TGID    CPU#  |||||  TIMESTAMP  FUNCTION
#              | |           |       |   |||||     |         |
"""


def trace_text(pid: int, other: int = 4242) -> str:
    return HEADER + "".join([
        f"          python-{pid}    (   {pid}) [001] .....  3467.762721: kvm_pio: rw=0x1 (1) port=0x10 (16) "
        f"size=0x1 (1) count=0x1 (1) val=0x18 (24)\n",
        f"          python-{pid}    (   {pid}) [001] .....  3467.762723: kvm_userspace_exit: reason=0x2 (2) "
        f"errno=0xfffffffc (-4)\n",
        f"     qemu-system-{other}   (   {other}) [000] .....  3467.762800: kvm_pio: rw=0x0 (0) port=0x60 (96) "
        f"size=0x1 (1) count=0x1 (1) val=0x0 (0)\n",
        f"   kworker/0:1-ev-{pid + 1} (-------) [000] d..1.  3467.762900: kvm_mmu_get_page: mmu_valid_gen=(1) "
        f"gfn=0x4 (4) shift=\xff comm=vcpu thread\n",
    ])


def make_tracefs(root: Path) -> Path:
    for system, name, text in (("kvm", "kvm_pio", PIO_FORMAT), ("kvm", "kvm_userspace_exit", EXIT_FORMAT),
                               ("kvmmmu", "kvm_mmu_get_page", PAGE_FORMAT)):
        (root / "events" / system / name).mkdir(parents=True)
        (root / "events" / system / name / "format").write_text(text)
    (root / "instances").mkdir()
    return root


def test_a_byte_printed_as_a_character_keeps_its_value(tmp_path):
    fs = SyntheticTracefs(make_tracefs(tmp_path), "")
    (tmp_path / "t").write_bytes(trace_text(100).encode("latin-1"))
    formats, _ = trace.read_formats(tmp_path / "events", ["kvmmmu:kvm_mmu_get_page"])
    [page] = trace.parse_trace(fs.read(tmp_path / "t"), formats)
    assert page["shift"] == -1


class SyntheticTracefs(trace.Tracefs):
    """A directory that acts like tracefs: an instance appears with its files, and goes whole."""

    def __init__(self, root: Path, text: str) -> None:
        super().__init__(root)
        self.text = text
        self.writes: list[tuple[str, str]] = []

    def make_instance(self, name: str) -> Path:
        path = super().make_instance(name)
        (path / "options").mkdir()
        (path / "per_cpu" / "cpu0").mkdir(parents=True)
        (path / "per_cpu" / "cpu0" / "stats").write_text("entries: 3\noverrun: 2\n")
        (path / "trace").write_text(self.text)
        return path

    def write(self, path: Path, value: str) -> None:
        self.writes.append((str(path.relative_to(self.root)), value))
        super().write(path, value)

    def remove_instance(self, path: Path) -> None:
        shutil.rmtree(path)


def test_parse_format_reads_names_offsets_sizes_and_signedness():
    fmt = trace.parse_format(PIO_FORMAT, "kvm")
    assert fmt.full_name == "kvm:kvm_pio" and fmt.id == 45
    assert [f.name for f in fmt.fields] == ["rw", "port", "size", "count", "val"]
    assert [f.name for f in fmt.common_fields][-1] == "common_pid"
    assert fmt.field("common_pid").signed and fmt.field("port") == trace.Field("port", "unsigned int", 12, 4, False)
    page = trace.parse_format(PAGE_FORMAT, "kvmmmu")
    assert page.field("comm").type == "char[16]" and page.field("comm").is_string
    assert page.field("shift").signed and page.field("shift").size == 1


def test_parse_format_refuses_what_is_not_a_format():
    with pytest.raises(trace.TraceError, match="not an event format"):
        trace.parse_format("hello\n")


def test_parse_trace_applies_the_format_and_keeps_this_process(tmp_path):
    formats, missing = trace.read_formats(make_tracefs(tmp_path) / "events",
                                          ["kvm:kvm_pio", "kvm:kvm_userspace_exit", "kvmmmu:kvm_mmu_get_page",
                                           "kvm:kvm_entry"])
    assert missing == ["kvm:kvm_entry"]
    events = trace.parse_trace(trace_text(100), formats, pids=[100, 101], tgid=100)
    assert [e.name for e in events] == ["kvm:kvm_pio", "kvm:kvm_userspace_exit", "kvmmmu:kvm_mmu_get_page"]
    pio, exit, page = events
    assert pio.fields == {"rw": 1, "port": 0x10, "size": 1, "count": 1, "val": 0x18}
    assert (pio.cpu, pio.pid, pio.tgid, pio.comm, pio.time) == (1, 100, 100, "python", 3467.762721)
    assert exit["errno"] == -4 and exit["reason"] == 2              # signed from the format
    assert page["mmu_valid_gen"] == 1 and page["shift"] == -1 and page["comm"] == "vcpu thread"
    assert page.tgid is None and page.pid == 101                    # kept: one of our threads
    everyone = trace.parse_trace(trace_text(100), formats)
    assert any(e.pid == 4242 for e in everyone)


def test_parse_trace_rejects_a_line_without_the_format_fields(tmp_path):
    formats, _ = trace.read_formats(make_tracefs(tmp_path) / "events", ["kvm:kvm_pio"])
    with pytest.raises(trace.TraceError, match="does not list"):
        trace.parse_trace("  python-1 (    1) [000] ..... 1.000001: kvm_pio: pio_write at 0x10\n", formats)


def test_event_names_need_a_system():
    for bad in ("kvm_pio", "kvm:", ":x", "kvm:a b", "../x:y"):
        with pytest.raises(trace.TraceError):
            trace.split_event_name(bad)


def test_record_on_a_synthetic_tracefs(tmp_path):
    fs = SyntheticTracefs(make_tracefs(tmp_path), trace_text(os.getpid()))
    with trace.record("kvm:kvm_pio", "kvm:kvm_userspace_exit", "kvm:kvm_entry", tracefs=fs) as t:
        assert t.instance.parent == tmp_path / "instances"
        assert t.instance.name.startswith(f"pykvm-{os.getpid()}-")
        assert (t.instance / "set_event").read_text() == "kvm:kvm_pio\nkvm:kvm_userspace_exit\n"
        assert str(os.getpid()) in (t.instance / "set_event_pid").read_text().split()
        assert (t.instance / "options" / "fields").read_text() == "1"
        assert (t.instance / "trace_clock").read_text() == "mono"
    assert t.present == ("kvm:kvm_pio", "kvm:kvm_userspace_exit") and t.missing == ("kvm:kvm_entry",)
    assert t.fired == {"kvm:kvm_pio", "kvm:kvm_userspace_exit"} and t.silent == ()
    assert t.lost == 2 and "2 events lost" in t.summary()
    assert os.listdir(tmp_path / "instances") == []
    assert not any("instances" not in path and "events" in path for path, _ in fs.writes)  # global untouched


def test_record_removes_the_instance_when_the_block_raises(tmp_path):
    fs = SyntheticTracefs(make_tracefs(tmp_path), trace_text(os.getpid()))
    with pytest.raises(RuntimeError, match="boom"):
        with trace.record("kvm:kvm_pio", tracefs=fs):
            assert len(os.listdir(tmp_path / "instances")) == 1
            raise RuntimeError("boom")
    assert os.listdir(tmp_path / "instances") == []


def test_a_missing_instances_folder_is_a_typed_error(tmp_path):
    (tmp_path / "events").mkdir()
    with pytest.raises(trace.TracingUnavailable, match="instances"):
        with trace.record("kvm:kvm_pio", tracefs=trace.Tracefs(tmp_path)):
            pass


def test_find_tracefs_reads_mountinfo(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text("22 1 0:20 / /sys rw - sysfs sysfs rw\n"
                    "40 22 0:12 / /sys/kernel/tracing rw,nosuid - tracefs nodev rw\n")
    assert trace.find_tracefs(str(info)) == Path("/sys/kernel/tracing")
    info.write_text("22 1 0:20 / /sys rw - sysfs sysfs rw\n")
    assert trace.find_tracefs(str(info)) is None


def test_without_root_the_error_says_what_to_do(monkeypatch):
    monkeypatch.setattr(trace, "find_tracefs", lambda: None)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(trace.TracingUnavailable, match="root"):
        trace.tracefs_root()


# ---- hardware --------------------------------------------------------------------

def _tracing_or_skip() -> None:
    try:
        trace.tracefs_root()
    except trace.TracingUnavailable as exc:
        pytest.skip(str(exc))


def test_records_pio_and_userspace_exit(vcpu):
    _tracing_or_skip()
    x86.load_code(vcpu, "mov $0x2a, %al\nout %al, $0x10\nhlt\n")
    with trace.record("kvm:kvm_pio", "kvm:kvm_userspace_exit", "kvm:no_such_event") as t:
        exit = vcpu.run()
    assert isinstance(exit, pykvm.IoExit)
    pios = t.named("kvm:kvm_pio")
    assert [(e["port"], e["rw"], e["val"]) for e in pios] == [(0x10, 1, 0x2a)]
    assert [e["reason"] for e in t.named("kvm:kvm_userspace_exit")] == [2]     # KVM_EXIT_IO
    assert all(e.pid in trace.process_threads() for e in t.events)
    assert t.missing == ("kvm:no_such_event",)
    assert trace.leftover_instances() == []


@pytest.mark.parametrize("vm", ["kernel"], indirect=True)
def test_records_an_msi(vm):
    _tracing_or_skip()
    vm.create_vcpu()
    message = MsiMessage.compose(destination=0, vector=0x45)
    with trace.record("kvm:kvm_msi_set_irq") as t:
        vm.signal_msi(message)
    assert [(e["address"], e["data"]) for e in t.events] == [(message.address_lo, message.data)]


def test_no_instance_is_left_when_the_block_raises(vcpu):
    _tracing_or_skip()
    x86.load_code(vcpu, "out %al, $0x10\nhlt\n")
    with pytest.raises(ZeroDivisionError):
        with trace.record("kvm:kvm_pio") as t:
            vcpu.run()
            assert t.instance.is_dir()
            1 / 0
    assert not t.instance.exists()
    assert trace.leftover_instances() == []


@pytest.mark.parametrize("text", ["'a'(97)", "'a' (97)", "a (97)", "(97)", "0x61 (97)"])
def test_a_u8_printed_quoted_or_bare_keeps_its_value(text):
    vec = trace.Field("vec", "__u8", 16, 1, False)
    assert trace._field_value(vec, text) == 97
