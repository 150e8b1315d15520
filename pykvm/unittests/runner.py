"""Run unittests.cfg entries to kvm-unit-tests' verdicts: under pykvm's Machine, or under QEMU for comparison.

Why this exists: an engineer reads kvm-unit-tests' results as its own runner
prints them (``PASS name (N tests, M unexpected failures)``, ``FAIL``,
``SKIP name (reason)``), so both runs end in the same :class:`EntryResult`:

- the status as ``run_tests.sh`` reads it: a write of v to the debug-exit port
  gives (v << 1) | 1; 1 (the test's ``exit(0)``) is a pass, 77 a skip, 124 a
  timeout, 127 an ``abort()``, anything else a failure;
- the summary, the last ``SUMMARY:`` line among the final five, in brackets;
- the ``PASS:``/``FAIL:``/``SKIP:`` lines the test printed, to compare runs;
- where pykvm itself stopped the guest (a KVM internal error, a triple
  fault), that stop, named.

The entry's conditions are checked first, as ``run_tests.sh`` does (arch,
``nodefault`` group, ``accel``, ``check`` files, ``disabled_if``), then what
pykvm lacks for it (:mod:`.plan`): each a SKIP with its reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import os
import re
import selectors
import shlex
import signal
import subprocess
import time
import warnings
from pathlib import Path

from ..core.errors import InvalidArgument
from ..vmm.bus import ExitSite
from ..vmm.cpu_model import CpuFeatureWarning
from ..vmm.machine import STATUS_POWER_OFF, Ending
from .config import ARCH, Entry, shell_true
from .plan import plan

STATUS_PASS_RAW = 1             # the debug-exit value 0, the test's exit(0)
STATUS_SKIP = 77
STATUS_TIMEOUT = 124
STATUS_ABORT = 127
QEMU_SLACK = 30.0               # seconds x86/run may take beyond the entry's timeout (its own `timeout -k 1s`)
ENDED_UNANNOUNCED = "the guest ended without the debug exit (a reset, triple fault or power-off)"
_RESULT_LINE = re.compile(r"^(PASS|FAIL|SKIP|XFAIL|XPASS): ?(.*)$")


class Verdict(enum.Enum):
    PASS = "PASS"
    FAIL = "FAIL"
    SKIP = "SKIP"


@dataclasses.dataclass(frozen=True)
class EntryResult:
    """How one entry ended under one runner (``pykvm`` or ``qemu``)."""

    name: str
    runner: str
    verdict: Verdict
    status: int | None          # the debug-exit status (odd), pykvm's own ending (even), None if not run
    summary: str = ""           # "(14 tests, 1 unexpected failures)", or "" when the test printed none
    reason: str = ""            # why it was skipped or how it was stopped, when there is no summary
    output: str = ""            # everything the test printed
    seconds: float = 0.0
    elapsed: float | None = None  # pykvm: the Machine's own clock (BootResult.elapsed), run() to the guest's end
    guest_seconds: float | None = None  # pykvm: the guest's own part of elapsed (BootResult.guest_seconds)
    exit_sites: dict[ExitSite, int] | None = None   # pykvm: its exits to userspace per site (BootResult.exit_sites)
    first_byte: float | None = None     # seconds from the run's start to the kernel's first output byte, if any

    @property
    def after_first_byte(self) -> float | None:
        """Seconds from the kernel's first output byte to the run's end: the kernel's own time, as any VMM's
        output shows it (None if it printed nothing or the run was not timed)."""
        if self.first_byte is None:
            return None
        return (self.elapsed if self.elapsed is not None else self.seconds) - self.first_byte

    @property
    def results(self) -> list[str]:
        """The test's own ``PASS:``/``FAIL:``/``SKIP:`` lines (``XFAIL``/``XPASS`` too), in order."""
        return [line.rstrip("\r") for line in self.output.splitlines() if _RESULT_LINE.match(line.rstrip("\r"))]

    def counts(self) -> dict[str, int]:
        found = {"PASS": 0, "FAIL": 0, "SKIP": 0}
        for line in self.results:
            kind = line.split(":")[0]
            found[{"XFAIL": "PASS", "XPASS": "FAIL"}.get(kind, kind)] += 1
        return found

    def line(self) -> str:
        """The line ``run_tests.sh`` would print for it (without colours)."""
        if self.summary and not self.reason:
            return f"{self.verdict.value} {self.name} {self.summary}"
        return f"{self.verdict.value} {self.name}" + (f" ({self.reason})" if self.reason else "")


def summary_of(output: str) -> str:
    """The summary ``run_tests.sh`` extracts: a ``SUMMARY:`` line among the last five, in brackets."""
    for line in output.splitlines()[-5:]:
        if line.startswith("SUMMARY: "):
            return f"({line[len('SUMMARY: '):].rstrip(chr(13))})"
    return ""


def _kernel_line(line: str) -> bool:
    """Whether a line of x86/run's output is the kernel's: not blank and not its echo of QEMU's command (which
    starts with ``timeout -k 1s --foreground 90s`` when run_tests.sh passes a TIMEOUT)."""
    return bool(line.strip()) and not line.startswith(("/", "qemu", "timeout "))


def verdict_of(status: int) -> Verdict:
    return Verdict.PASS if status == STATUS_PASS_RAW else Verdict.SKIP if status == STATUS_SKIP else Verdict.FAIL


def skip_reason(entry: Entry, tree: Path, group: str | None = None) -> str:
    """Why ``run_tests.sh`` would skip ``entry`` on this machine, or ""."""
    if "nodefault" in entry.groups and group is None:
        return "test marked as manual run only"
    if entry.arch and entry.arch != ARCH:
        return f"{entry.arch} only"
    if entry.accel and entry.accel.split(",")[0] != "kvm":
        return f"{entry.accel} only, but ACCEL=kvm"
    if entry.disabled_if and shell_true(entry.disabled_if, tree):
        return f"disabled because: {entry.disabled_if}"
    for condition in entry.check:
        path, _, value = condition.partition("=")
        try:
            actual = Path(path).read_text().strip()
        except OSError:
            actual = None
        if actual != value:
            return f"{path} not equal to {value}"
    if not entry.kernel(tree).is_file():
        return f"Test file '{entry.kernel(tree)}' not found"
    return ""


def run_pykvm(entry: Entry, tree: Path, timeout: float | None = None, group: str | None = None) -> EntryResult:
    """``entry`` booted by pykvm's Machine (in this process); ``timeout`` overrides the entry's."""
    reason = skip_reason(entry, tree, group)
    if reason:
        return EntryResult(entry.name, "pykvm", Verdict.SKIP, None, reason=reason)
    try:
        machine_plan = plan(entry, tree)
        if machine_plan.missing:
            return EntryResult(entry.name, "pykvm", Verdict.SKIP, None,
                           reason="pykvm lacks " + "; ".join(machine_plan.missing))
        machine = machine_plan.machine()
    except InvalidArgument as exc:
        return EntryResult(entry.name, "pykvm", Verdict.SKIP, None, reason=f"pykvm cannot build its machine: {exc}")
    started = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CpuFeatureWarning)
        result = machine.run(timeout=timeout or entry.timeout)
    seconds = time.monotonic() - started
    # QEMU's warnings (a CPU feature the host lacks) go to its stderr, into the runner's log, not to the
    # screen; pykvm's go at the top of the entry's output, which is that log.
    output = "".join(f"pykvm: warning: {warning.message}\n" for warning in caught
                     if issubclass(warning.category, CpuFeatureWarning)) + result.text
    verdict, summary, reason = Verdict.FAIL, "", ""
    if result.ending == Ending.EXIT_PORT:                   # the test's own verdict, by the debug-exit status
        verdict, summary = verdict_of(result.status), summary_of(output)
    elif result.ending == Ending.TIMEOUT:
        reason = f"timeout; duration={timeout or entry.timeout:g}s"
    else:
        reason = f"{result.ending.value}: {result.message}"
    return EntryResult(entry.name, "pykvm", verdict, result.status, summary, reason, output, seconds,
                       elapsed=result.elapsed, guest_seconds=result.guest_seconds, exit_sites=result.exit_sites,
                       first_byte=result.first_byte)


def qemu_command(entry: Entry, tree: Path, timeout: float | None = None) -> str:
    """The shell command ``run_tests.sh`` runs for ``entry`` (its ``get_cmdline``), to run in ``tree``."""
    seconds = timeout or entry.timeout
    parts = [f"TESTNAME={shlex.quote(entry.name)}", f"TIMEOUT={seconds:g}s", f"MACHINE={shlex.quote(entry.machine)}",
             "ACCEL=kvm", "./x86/run", shlex.quote(f"x86/{entry.file}"), f"-smp {entry.smp}"]
    if entry.test_args:
        parts.append(f"-append {entry.test_args}")
    parts.append(entry.qemu_params)
    return " ".join(part for part in parts if part)


def run_qemu(entry: Entry, tree: Path, timeout: float | None = None, group: str | None = None,
             qemu: str | None = None) -> EntryResult:
    """``entry`` under QEMU, through the tree's own ``x86/run`` (``qemu`` names the binary, else PATH's)."""
    reason = skip_reason(entry, tree, group)
    if reason:
        return EntryResult(entry.name, "qemu", Verdict.SKIP, None, reason=reason)
    environment = dict(os.environ, QEMU=qemu) if qemu else dict(os.environ)
    seconds = timeout or entry.timeout
    done = _run_timed(["bash", "-c", qemu_command(entry, tree, timeout)], tree, environment, seconds + QEMU_SLACK)
    output = done.stdout.decode(errors="replace")
    if done.returncode is None:
        return EntryResult(entry.name, "qemu", Verdict.FAIL, STATUS_TIMEOUT, reason=f"timeout; duration={seconds:g}s",
                       output=output, seconds=done.seconds, first_byte=done.first_kernel_byte)
    status = done.returncode
    # x86/run reports run_tests.sh's scale (0 pass, 77 skip, 124 timeout, >128 a signal, else a failure);
    # give the debug-exit status pykvm reports: a pass is 1 there.
    raw = STATUS_PASS_RAW if status == 0 else status
    if status == 1 and done.first_kernel_byte is not None:      # the kernel printed: it ran
        # The kernel ran and ended without the debug exit: QEMU's -no-reboot exits 0 on a reset, a triple
        # fault or a power-off, and x86/run reports that as 1. run_tests.sh calls it a FAIL; so does this.
        return EntryResult(entry.name, "qemu", Verdict.FAIL, STATUS_POWER_OFF, summary_of(output),
                       reason=ENDED_UNANNOUNCED, output=output, seconds=done.seconds,
                       first_byte=done.first_kernel_byte)
    if status in (1, 2):
        # QEMU (1) or the run script (2) failed before the test ran: an option or CPU feature QEMU refuses
        # here. run_tests.sh skips such an entry with QEMU's last word, and so does this.
        lines = [line for line in done.stderr.decode(errors="replace").splitlines()
                 if line.strip() and "warning" not in line.lower()] or output.strip().splitlines()
        return EntryResult(entry.name, "qemu", Verdict.SKIP, raw, reason=lines[-1] if lines else "QEMU did not start",
                       output=output, seconds=done.seconds)
    reason = f"timeout; duration={seconds:g}s" if status == STATUS_TIMEOUT else ""
    stopped = [line for line in done.stderr.decode(errors="replace").splitlines()
               if line.startswith(("KVM internal error", "KVM: entry failed"))]
    if stopped:          # QEMU stops the vCPU there and waits: the timeout follows
        reason = f"{stopped[0].strip()}" + (f"; then {reason}" if reason else "")
    return EntryResult(entry.name, "qemu", verdict_of(raw), raw, summary_of(output), reason=reason, output=output,
                   seconds=done.seconds, first_byte=done.first_kernel_byte)


@dataclasses.dataclass(frozen=True)
class TimedRun:
    """A finished command: its status (None: killed at the deadline), its output, and when its kernel spoke."""

    returncode: int | None
    stdout: bytes
    stderr: bytes
    seconds: float                      # from the spawn to the end (or the kill)
    first_kernel_byte: float | None     # from the spawn to the first byte of x86/run's output that is the kernel's


def _run_timed(argv: list[str], cwd: Path, environment: dict[str, str], limit: float) -> TimedRun:
    """Run ``argv`` to its end or ``limit`` seconds, noting when each piece of its standard output came, so that
    the kernel's first byte (after x86/run's echo of QEMU's command) is timed. Its process group is killed at the
    limit, and on any exception here (Ctrl-C) before it is raised again."""
    started = time.monotonic()
    process = subprocess.Popen(argv, cwd=cwd, env=environment, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, start_new_session=True)
    assert process.stdout is not None and process.stderr is not None
    out, err = process.stdout.fileno(), process.stderr.fileno()
    pieces: dict[int, list[bytes]] = {out: [], err: []}
    arrivals: list[tuple[int, float]] = []          # (stdout bytes so far, seconds since the spawn)
    received = 0
    finished = False
    try:
        with selectors.DefaultSelector() as selector:
            for fd in (out, err):
                selector.register(fd, selectors.EVENT_READ)
            while selector.get_map() and time.monotonic() - started < limit:
                for key, _ in selector.select(limit - (time.monotonic() - started)):
                    data = os.read(key.fd, 65536)
                    if not data:
                        selector.unregister(key.fd)
                        continue
                    pieces[key.fd].append(data)
                    if key.fd == out:
                        received += len(data)
                        arrivals.append((received, time.monotonic() - started))
            finished = not selector.get_map()
    finally:
        if not finished:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        process.stdout.close()
        process.stderr.close()
    stdout = b"".join(pieces[out])
    return TimedRun(process.returncode if finished else None, stdout, b"".join(pieces[err]),
                    time.monotonic() - started, _first_kernel_byte(stdout, arrivals))


def _first_kernel_byte(stdout: bytes, arrivals: list[tuple[int, float]]) -> float | None:
    """When the first byte of the kernel's output came: that of its first line (see :func:`_kernel_line`)."""
    offset = 0
    for line in stdout.splitlines(keepends=True):
        if _kernel_line(line.decode(errors="replace")):
            return next((when for size, when in arrivals if size > offset), None)
        offset += len(line)
    return None
