"""``python -m pykvm.bench boot``: time to the first serial byte and to exit for the hello kernel.

Why this exists: a VMM for tests must boot fast, and "fast" means something
only next to a reference measured in the same run on the same kernel. Three
ways are timed, in rotating order each round:

- ``Machine.run()`` in this process: from the call (VM creation included) to
  the first byte the guest writes to COM1, and to its debug-exit write;
- ``python -m pykvm.boot`` as a command: from spawning it to the first byte on
  its stdout, and to its exit (interpreter start and imports included);
- ``qemu-system-x86_64 -accel kvm`` with ``-kernel`` (its Multiboot loader,
  SeaBIOS first) and ``isa-debug-exit`` at 0xf4, when it is installed: from
  spawning it to its first stdout byte and to its exit. Where QEMU cannot use
  this host's KVM (kvm_pvm), the report says why and gives pykvm alone.

For the command, the report also gives its threads' time on a CPU and
waiting for one up to its first byte (the kernel's ``schedstat``, as
:func:`pykvm.runtime.cpu_wait.scheduled` reads it): pykvm's and Python's own
cost, apart from the host's load, which on a shared machine can double the
wall time.

The command's time includes compiling any of pykvm's modules whose cached
bytecode is missing or older than the source; where ``PYTHONDONTWRITEBYTECODE``
is set (as in CI) every spawn compiles them again, so the report names them
(:func:`stale_bytecode`) and how to compile them once.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

from ..core.system import Kvm
from ..runtime.cpu_wait import scheduled
from . import testkernels
from .machine import Machine

TARGET_FIRST_BYTE_MS = 50.0
TARGET_COMMAND_FIRST_BYTE_MS = 150.0     # python -m pykvm.boot, interpreter start and imports included
HELLO_STATUS = 1                # the hello kernel writes 0 to the debug-exit port
TIMEOUT = 20.0


@dataclasses.dataclass
class Spawned:
    """One run of a command: seconds to its first stdout byte (-1: none) and to its exit (-1: timed out)."""

    first: float
    end: float
    status: int
    output: bytes
    errors: str
    cpu: float = 0.0        # seconds its threads ran on a CPU up to the first byte, summed
    waited: float = 0.0     # seconds its threads were runnable but waited for a CPU up to the first byte


def _spawn(argv: list[str]) -> Spawned:
    """Run ``argv``, timing it and reading its scheduler statistics when its first stdout byte arrives."""
    start = time.perf_counter()
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    first, output, cpu, waited = -1.0, b"", 0.0, 0.0
    try:
        chunk = os.read(process.stdout.fileno(), 4096)
        if chunk:
            first = time.perf_counter() - start
            cpu, waited = scheduled(process.pid)
        output = chunk
        rest, errors = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        rest, errors = process.communicate()
        return Spawned(first, -1.0, -1, output + rest, errors.decode(errors="replace") + "\n(timed out)")
    return Spawned(first, time.perf_counter() - start, process.returncode, output + rest,
                   errors.decode(errors="replace"), cpu, waited)


def stale_bytecode(package_dir: Path) -> list[Path]:
    """The sources under ``package_dir`` whose cached bytecode (``__pycache__``) is missing or not theirs.

    A cached file is theirs when it has this Python's magic number and, if it is checked by timestamp
    (PEP 552 flags 0), the source's modification time and size; Python compiles any other module in
    each process that imports it.
    """
    stale = []
    for source in sorted(package_dir.rglob("*.py")):
        try:
            with open(importlib.util.cache_from_source(str(source)), "rb") as cached:
                header = cached.read(16)
        except OSError:
            stale.append(source)
            continue
        status = source.stat()
        flags, mtime, size = struct.unpack_from("<III", header.ljust(16, b"\0"), 4)
        timestamp_differs = (mtime, size) != (int(status.st_mtime) & 0xFFFFFFFF, status.st_size & 0xFFFFFFFF)
        if header[:4] != importlib.util.MAGIC_NUMBER or (flags == 0 and timestamp_differs):
            stale.append(source)
    return stale


def _bytecode_note() -> list[str]:
    """A line for the report when each spawned command would compile some of pykvm's modules again."""
    package_dir = Path(__file__).resolve().parent.parent
    stale = stale_bytecode(package_dir) if os.environ.get("PYTHONDONTWRITEBYTECODE") else []
    if not stale:
        return []
    names = ", ".join(str(path.relative_to(package_dir.parent)) for path in stale[:3])
    return [f"  note: PYTHONDONTWRITEBYTECODE is set and {len(stale)} of pykvm's modules have no up-to-date "
            f"bytecode ({names}{', ...' if len(stale) > 3 else ''}): each command run compiled them; compile "
            f"them once (python -m compileall {package_dir}) to time the command alone"]


def qemu_argv(kernel: str) -> list[str] | None:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return None
    return [qemu, "-accel", "kvm", "-M", "pc", "-m", "128", "-display", "none", "-nodefaults", "-no-user-config",
            "-serial", "stdio", "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-kernel", kernel]


def bench_boot(rounds: int = 10) -> list[str]:
    """Time ``rounds`` boots of the hello kernel each way; the report lines."""
    kernel = str(testkernels.path("hello"))
    times: dict[str, list[tuple[float, float]]] = {"in-process": [], "command": [], "qemu": []}
    scheduling: list[tuple[float, float]] = []      # the command's (CPU, waiting for a CPU) to its first byte
    load = os.getloadavg()[0]
    qemu = qemu_argv(kernel)
    qemu_problem = None if qemu is not None else "qemu-system-x86_64 is not installed"
    expected = b"Hello from a Multiboot kernel on pykvm\n"
    with Kvm() as kvm:
        from ..hosts import detect
        host = detect().name
        Machine(kernel, kvm=kvm).run(timeout=TIMEOUT)           # warm up caches and imports

        def in_process() -> None:
            result = Machine(kernel, kvm=kvm).run(timeout=TIMEOUT)
            if result.status != HELLO_STATUS or result.serial != expected or result.first_byte is None:
                raise RuntimeError(f"the hello kernel misbehaved in-process: {result}")
            times["in-process"].append((result.first_byte, result.elapsed))

        def command() -> None:
            run = _spawn([sys.executable, "-m", "pykvm.boot", kernel])
            if run.status != HELLO_STATUS or run.output != expected:
                raise RuntimeError(f"python -m pykvm.boot failed (status {run.status}): {run.errors.strip()}")
            times["command"].append((run.first, run.end))
            scheduling.append((run.cpu, run.waited))

        def run_qemu() -> None:
            nonlocal qemu_problem
            if qemu_problem is not None or qemu is None:
                return
            run = _spawn(qemu)
            if run.status != HELLO_STATUS or expected not in run.output:
                reason = run.errors.strip().splitlines()
                qemu_problem = (f"QEMU could not boot the kernel with -accel kvm on {host} (status {run.status}): "
                                f"{' / '.join(reason[-3:]) or run.output[-200:]!r}")
                return
            times["qemu"].append((run.first, run.end))

        order = [in_process, command, run_qemu]
        for index in range(rounds):
            for measure in order[index % 3:] + order[:index % 3]:
                measure()
    lines = [f"boot: hello kernel ({os.path.getsize(kernel)} bytes), {rounds} rounds, the ways in rotating order; "
             f"host {host}; load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; "
             f"milliseconds, median (best)"]
    labels = {"in-process": "pykvm Machine.run() in-process", "command": "python -m pykvm.boot (process)",
              "qemu": "qemu-system-x86_64 -accel kvm"}
    lines.append(f"  {'':34} {'first serial byte':>22} {'exit':>22}")
    for way, samples in times.items():
        if not samples:
            continue
        first = [sample[0] * 1e3 for sample in samples]
        end = [sample[1] * 1e3 for sample in samples]
        lines.append(f"  {labels[way]:34} {statistics.median(first):12.1f} ({min(first):6.1f})  "
                     f"{statistics.median(end):12.1f} ({min(end):6.1f})")
    cpu, waited = ([sample[index] * 1e3 for sample in scheduling] for index in (0, 1))
    lines.append(f"  the command to its first byte: {statistics.median(cpu):.1f} ({min(cpu):.1f}) on a CPU, "
                 f"{statistics.median(waited):.1f} ({min(waited):.1f}) waiting for one (its threads summed)")
    if qemu_problem is not None:
        lines.append(f"  QEMU: not measured: {qemu_problem}")
    lines += _bytecode_note()
    first_ms = statistics.median(sample[0] for sample in times["in-process"]) * 1e3
    verdict = "meets" if first_ms < TARGET_FIRST_BYTE_MS else "MISSES"
    lines.append(f"  target: first byte under {TARGET_FIRST_BYTE_MS:g} ms in-process: {first_ms:.1f} ms, {verdict}")
    command_ms = statistics.median(sample[0] for sample in times["command"]) * 1e3
    verdict = "meets" if command_ms <= TARGET_COMMAND_FIRST_BYTE_MS else "MISSES"
    lines.append(f"  target: first byte at most {TARGET_COMMAND_FIRST_BYTE_MS:g} ms as a command: {command_ms:.1f} ms, "
                 f"{verdict}")
    if times["qemu"]:
        ratio = statistics.median(s[0] for s in times["qemu"]) / statistics.median(s[0] for s in times["command"])
        lines.append(f"  QEMU / pykvm command, time to the first byte: {ratio:.2f}")
    return lines
