"""``bench boot``'s check that the command it times does not compile pykvm's modules in every spawn."""

from __future__ import annotations

import importlib.util
import py_compile
import sys
from pathlib import Path

import pytest

from pykvm.vmm import bench


def _compiled(folder: Path, name: str, text: str) -> Path:
    source = folder / name
    source.write_text(text)
    py_compile.compile(str(source), doraise=True, invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
    return source


@pytest.mark.host_independent
def test_stale_bytecode_lists_changed_uncompiled_and_foreign_modules_only(tmp_path):
    fresh = _compiled(tmp_path, "fresh.py", "A = 1\n")
    changed = _compiled(tmp_path, "changed.py", "B = 1\n")
    (tmp_path / "sub").mkdir()
    foreign = _compiled(tmp_path / "sub", "foreign.py", "C = 1\n")
    assert bench.stale_bytecode(tmp_path) == []                 # the control: all compiled from these sources
    changed.write_text("B = 12345\n")                           # another size: the cached file is not its
    uncompiled = tmp_path / "uncompiled.py"
    uncompiled.write_text("D = 1\n")
    cached = Path(importlib.util.cache_from_source(str(foreign)))
    cached.write_bytes(b"\0\0\r\n" + cached.read_bytes()[4:])    # another Python's magic number
    assert bench.stale_bytecode(tmp_path) == sorted([changed, foreign, uncompiled])
    assert fresh not in bench.stale_bytecode(tmp_path)


@pytest.mark.host_independent
def test_the_report_names_stale_modules_only_where_no_bytecode_is_written(monkeypatch):
    stale = [Path(bench.__file__).resolve()]
    monkeypatch.setattr(bench, "stale_bytecode", lambda package_dir: stale)
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    note = bench._bytecode_note()
    assert len(note) == 1 and "1 of pykvm's modules" in note[0] and "pykvm/vmm/bench.py" in note[0], note
    assert "python -m compileall" in note[0]
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE")                # the first spawn writes them: nothing to say
    assert bench._bytecode_note() == []


@pytest.mark.host_independent
def test_a_spawn_counts_its_cpu_time_to_the_first_byte_not_its_sleep():
    # It sleeps after its byte, so what the spawn reads as the byte arrives is what ran before it.
    spin = ("import time\nend = time.thread_time() + 0.15\nwhile time.thread_time() < end: pass\n"
            "print('x', flush=True)\ntime.sleep(0.3)")
    spun = bench._spawn([sys.executable, "-c", spin])
    assert (spun.status, spun.output) == (0, b"x\n"), spun.errors
    assert spun.cpu >= 0.15 and spun.cpu + spun.waited <= spun.first + 0.02 and spun.first + 0.3 <= spun.end
    # The control: sleeping as long costs no CPU time.
    slept = bench._spawn([sys.executable, "-c", "import time\ntime.sleep(0.15)\nprint('x')"])
    assert slept.first >= 0.15 and slept.cpu < 0.1, slept
