"""``python -m pykvm.bench unittests KUT_DIR [TEST ...]``: kvm-unit-tests entries' wall time, pykvm against QEMU.

Why this exists: the project's claim is that pykvm runs the suite faster
than QEMU on the same host (its target: pykvm's total at most a quarter of
QEMU's). That means something only as a ratio of runs made in the same
benchmark, interleaved under the same load, on entries both run to a PASS.

What is timed, for each entry (``time.perf_counter()`` around the call):

- pykvm in-process: :func:`~pykvm.unittests.run_pykvm` from the call to its
  verdict: the cfg's shell expansion, building the Machine, the boot, the
  teardown;
- pykvm command: ``python -m pykvm.unittests KUT_DIR TEST`` from spawning it
  to its exit: Python's start-up and pykvm's imports included;
- QEMU: :func:`~pykvm.unittests.run_qemu`, the tree's own ``x86/run`` as
  ``run_tests.sh`` runs it, from spawning it to its exit (the script first
  asks QEMU for its device list, as it does for every entry there).

The headline ratio is the command's total over QEMU's: like QEMU's figure it
is a fresh process per entry, start-up included, so it never under-counts
what a user pays for pykvm. (One ``python -m pykvm.unittests KUT_DIR`` for a
whole suite pays the start-up once and approaches the in-process ratio,
printed beside it.)

First every entry runs once under pykvm in-process and, if it passed, once
under QEMU: those that PASS under both are measured (these runs warm the
caches and are not counted), the others are listed with the reason. Then
each round times every entry three ways, in an order that rotates per round;
an entry that does not PASS in a timed run is dropped and listed too. The
figures are per-entry medians and their ratios, and the totals of those
medians. Two cross-checks: the Machine's own clock (``BootResult.elapsed``)
against the time measured around ``run_pykvm``, and CPU time (``getrusage``
of this process and its children) against wall time, with the ratio by CPU
time, which other load on the machine inflates less than wall time.

Then where pykvm's time goes: the guest's own time in each in-process run
(:attr:`~pykvm.vmm.BootResult.guest_seconds`: vCPU 0 inside ``KVM_RUN``, plus
any ACPI S3 sleep) against QEMU's median, and its total as the floor, the
ratio pykvm would reach if all of its own time (start-up, building the
Machine, exits handled in Python, teardown) were nil. The same kernel does the
same work under QEMU on the same KVM (the vmexit tests, for one, loop until
2^30 TSC cycles have passed), so the floor tells how far any speed-up of
pykvm's own can take the ratio. Beside each entry's guest time: the Machine's
time outside ``KVM_RUN`` (``elapsed`` less the guest's: the exits handled in
Python, starting and joining the vCPU threads), its exits to userspace and
the sites most of them went to (``exit_sites`` of :class:`~pykvm.vmm.BootResult`),
so an entry whose time goes to exits handled in Python shows it.

The floor is checked by a second method that needs no pykvm figure: in QEMU's
runs, the time from the kernel's first byte of output (the first line after
x86/run's echo of QEMU's command) to QEMU's exit. QEMU's firmware and
start-up all come before that byte, so that time is the kernels' own work
under QEMU, less what each did before it first printed; the same span in
pykvm's runs (``BootResult.first_byte`` to the guest's end) is printed beside it.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ..hosts import detect_vendor
from ..vmm.bus import ExitSite
from .__main__ import select
from .config import ConfigError, Entry, read_config
from .runner import Verdict, run_pykvm, run_qemu

PROG = "pykvm bench unittests"
TARGET = 0.25                   # pykvm's total over QEMU's, the project's target on this host
WAYS = ("in-process", "command", "qemu")
LABELS = {"in-process": "pykvm in-process", "command": "pykvm command", "qemu": "QEMU x86/run"}
HEADLINE = "command"
COMMAND_SLACK = 60.0            # seconds a command may take beyond its entry's timeout (start-up, teardown)
BUSIEST_SITES = 3               # exit sites printed per entry


@dataclasses.dataclass(frozen=True)
class Run:
    """How one run of an entry ended: the runner's line for it, whether it passed, the Machine's own time."""

    line: str
    passed: bool
    elapsed: float | None = None    # BootResult.elapsed, in-process only
    guest: float | None = None      # BootResult.guest_seconds, in-process only
    sites: dict[ExitSite, int] | None = None    # BootResult.exit_sites, in-process only
    kernel: float | None = None     # seconds from the kernel's first output byte to the end (in-process, QEMU)


@dataclasses.dataclass(frozen=True)
class Sample:
    """One timed run: seconds of wall time and of CPU time (user + sys of this process and its children)."""

    run: Run
    wall: float
    cpu: float


Runner = Callable[[Entry], Run]


def runners(tree: Path, qemu: str | None) -> dict[str, Runner]:
    """The three ways to run an entry of ``tree``; ``qemu`` names QEMU's binary (None: x86/run's search)."""
    def in_process(entry: Entry) -> Run:
        outcome = run_pykvm(entry, tree)
        return Run(outcome.line(), outcome.verdict == Verdict.PASS, outcome.elapsed, outcome.guest_seconds,
                   outcome.exit_sites, outcome.after_first_byte)

    def command(entry: Entry) -> Run:
        argv = [sys.executable, "-m", "pykvm.unittests", str(tree), entry.name]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                  timeout=entry.timeout + COMMAND_SLACK)
        except subprocess.TimeoutExpired:
            return Run(f"python -m pykvm.unittests did not end within {entry.timeout + COMMAND_SLACK:g} s", False)
        line = next(iter(done.stdout.splitlines()), done.stderr.strip() or f"no output, status {done.returncode}")
        return Run(line, done.returncode == 0 and line.startswith(f"PASS {entry.name}"))

    def under_qemu(entry: Entry) -> Run:
        outcome = run_qemu(entry, tree, qemu=qemu)
        return Run(outcome.line(), outcome.verdict == Verdict.PASS, kernel=outcome.after_first_byte)

    return {"in-process": in_process, "command": command, "qemu": under_qemu}


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(runner: Runner, entry: Entry) -> Sample:
    cpu = _cpu_seconds()
    start = time.perf_counter()
    run = runner(entry)
    wall = time.perf_counter() - start
    return Sample(run, wall, _cpu_seconds() - cpu)


def qualify(entries: Sequence[Entry], ways: dict[str, Runner],
            say: Callable[[str], None]) -> tuple[list[Entry], dict[str, str]]:
    """The entries that PASS under pykvm (in-process) and QEMU, and why each other one is left out.

    QEMU is not run for an entry pykvm did not pass: it is left out either way.
    """
    kept: list[Entry] = []
    left_out: dict[str, str] = {}
    for entry in entries:
        mine = ways["in-process"](entry)
        theirs = ways["qemu"](entry) if mine.passed else None
        if theirs is None:
            left_out[entry.name] = f"under pykvm: {mine.line} (QEMU not run)"
        elif not theirs.passed:
            left_out[entry.name] = f"under QEMU: {theirs.line} (pykvm: {mine.line})"
        else:
            kept.append(entry)
        say(f"  {entry.name}: " + (f"left out, {left_out[entry.name]}" if entry.name in left_out else "measured"))
    return kept, left_out


def rotation(round_index: int) -> tuple[str, ...]:
    """The order of the ways in round ``round_index`` (from 0): each goes first in turn."""
    shift = round_index % len(WAYS)
    return WAYS[shift:] + WAYS[:shift]


def measure(entries: Sequence[Entry], ways: dict[str, Runner], rounds: int, say: Callable[[str], None],
            ) -> tuple[dict[str, dict[str, list[Sample]]], dict[str, str]]:
    """``rounds`` timed runs of each entry each way; the samples of the entries that always passed, and the rest."""
    samples: dict[str, dict[str, list[Sample]]] = {entry.name: {way: [] for way in WAYS} for entry in entries}
    dropped: dict[str, str] = {}
    for index in range(rounds):
        order = rotation(index)
        say(f"  round {index + 1} of {rounds}: {', '.join(LABELS[way] for way in order)}")
        for entry in (entry for entry in entries if entry.name not in dropped):
            for way in order:
                sample = timed(ways[way], entry)
                if not sample.run.passed:
                    dropped[entry.name] = f"round {index + 1}, {LABELS[way]}: {sample.run.line}"
                    break
                samples[entry.name][way].append(sample)
    return {name: kept for name, kept in samples.items() if name not in dropped}, dropped


@dataclasses.dataclass(frozen=True)
class Conditions:
    """What the figures were measured under."""

    vendor: str                         # the KVM vendor module
    cpus: int
    load_start: tuple[float, float, float]
    load_end: tuple[float, float, float]
    qemu: str                           # QEMU's binary and version, or why it is unknown

    @property
    def loaded(self) -> bool:
        """Other work was running before the first run (1-minute load average of 1 or more)."""
        return self.load_start[0] >= 1.0

    def lines(self) -> list[str]:
        def load(values: tuple[float, float, float]) -> str:
            return " ".join(f"{value:.2f}" for value in values)
        lines = [f"conditions: host {self.vendor}, {self.cpus} CPUs, load average (1, 5, 15 min) "
                 f"{load(self.load_start)} at start, {load(self.load_end)} at end (this benchmark's own runs "
                 f"add about 1)",
                 f"QEMU: {self.qemu}"]
        if self.loaded:
            lines.append("the machine was loaded by other work (1-minute load average >= 1 at start): absolute "
                         "times are inflated and noisy; the ratios compare runs interleaved under the same load")
        return lines


def conditions(load_start: tuple[float, float, float], qemu: str | None) -> Conditions:
    """The conditions now, with the load average ``load_start`` taken before the first run."""
    return Conditions(detect_vendor().value, os.cpu_count() or 0, load_start, os.getloadavg(), _qemu_version(qemu))


def _qemu_version(qemu: str | None) -> str:
    if qemu is None:
        return "not found on PATH (x86/run searched for it itself)"
    try:
        done = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{qemu} (its version unknown: {exc})"
    return f"{qemu}, {next(iter(done.stdout.splitlines()), 'no version printed').strip()}"


@dataclasses.dataclass(frozen=True)
class Result:
    """Every timed sample of the entries measured, and why the others were left out."""

    rounds: int
    samples: dict[str, dict[str, list[Sample]]]      # entry -> way -> one sample per round
    left_out: dict[str, str]
    conditions: Conditions

    def median(self, name: str, way: str) -> float:
        return statistics.median(sample.wall for sample in self.samples[name][way])

    def _run_median(self, name: str, way: str, figure: str) -> float | None:
        """The median of :class:`Run`'s ``figure`` over ``name``'s runs ``way``, or None if a run lacks it."""
        runs: list[float | None] = [getattr(sample.run, figure) for sample in self.samples[name][way]]
        return None if None in runs else statistics.median(run for run in runs if run is not None)

    def guest(self, name: str) -> float | None:
        """The median of the guest's own time in ``name``'s in-process runs, or None if a run lacks it."""
        return self._run_median(name, "in-process", "guest")

    def kernel(self, name: str, way: str) -> float | None:
        """The median of ``name``'s seconds from the kernel's first output byte to the end, ``way``'s runs; None if
        a run lacks it."""
        return self._run_median(name, way, "kernel")

    def outside(self, name: str) -> tuple[float, dict[ExitSite, int]] | None:
        """The median of the Machine's time outside ``KVM_RUN`` in ``name``'s in-process runs, and the exit
        sites of its run with the median number of exits; None if a run lacks either."""
        runs = [sample.run for sample in self.samples[name]["in-process"]]
        if any(run.elapsed is None or run.guest is None or run.sites is None for run in runs):
            return None
        by_exits = sorted(runs, key=lambda run: sum((run.sites or {}).values()))
        return (statistics.median((run.elapsed or 0.0) - (run.guest or 0.0) for run in runs),
                by_exits[len(by_exits) // 2].sites or {})

    def total(self, way: str, cpu: bool = False) -> float:
        """The sum over entries of each entry's median (of wall time, or of CPU time)."""
        return sum(statistics.median(sample.cpu if cpu else sample.wall for sample in ways[way])
                   for ways in self.samples.values())

    def ratio(self, way: str, cpu: bool = False) -> float:
        """``way``'s total over QEMU's."""
        return self.total(way, cpu) / self.total("qemu", cpu)

    def report(self) -> list[str]:
        lines = [f"unittests: {len(self.samples)} entries PASS under both pykvm and QEMU, {self.rounds} "
                 f"round{'s' if self.rounds != 1 else ''}, each timing every entry the three ways in an order that "
                 f"rotates per round"]
        lines += ["  " + line for line in self.conditions.lines()]
        lines += ["  timed (perf_counter): pykvm in-process = run_pykvm() from the call to its verdict; pykvm "
                  "command = python -m pykvm.unittests KUT_DIR TEST, spawn to exit (Python's start-up and imports "
                  "included); QEMU = the tree's x86/run through run_qemu(), spawn to exit"]
        if self.samples:
            lines += self._table() + self._cross_checks()
        for name, reason in self.left_out.items():
            lines.append(f"  left out: {name}: {reason}")
        return lines

    def _table(self) -> list[str]:
        width = max(len("total"), *(len(name) for name in self.samples))
        header = f"  {'seconds, median':<{width}}" + "".join(f"{LABELS[way]:>18}" for way in WAYS)
        lines = [header + f"{'in-process/QEMU':>17}{'command/QEMU':>14}"]
        rows = [(name, [self.median(name, way) for way in WAYS]) for name in self.samples]
        rows.append(("total", [self.total(way) for way in WAYS]))
        for name, (mine, command, qemu) in rows:
            lines.append(f"  {name:<{width}}{mine:18.3f}{command:18.3f}{qemu:18.3f}{mine / qemu:17.3f}"
                         f"{command / qemu:14.3f}")
        headline = self.ratio(HEADLINE)
        verdict = "met" if headline <= TARGET else "NOT met"
        lines.append(f"  headline: pykvm command total / QEMU total = {headline:.3f}; target <= 1/4: {verdict} "
                     f"(a process per entry on both sides, start-up included, as a user pays for one test)")
        startup = statistics.median(self.median(name, "command") - self.median(name, "in-process")
                                    for name in self.samples)
        lines.append(f"  in-process total / QEMU total = {self.ratio('in-process'):.3f} (what one command for the "
                     f"whole suite approaches: it pays Python's start-up once; per command here, a median "
                     f"{startup:.3f} s)")
        return lines + self._floor()

    def _floor(self) -> list[str]:
        """Where pykvm's time goes: the guest's own (any VMM's floor) and pykvm's, against QEMU's total."""
        guests = {name: self.guest(name) for name in self.samples}
        if None in guests.values():
            return []
        qemu, command = self.total("qemu"), self.total(HEADLINE)
        lines = ["  the guest's own time in pykvm's in-process runs (median; vCPU 0 inside KVM_RUN, plus any ACPI S3 "
                 "sleep), per entry, and over QEMU's median:"]
        lines += [f"    {name}: {guest:.3f} s, {guest / self.median(name, 'qemu'):.3f}{self._exits(name)}"
                  for name, guest in guests.items() if guest is not None]
        floor = sum(guest for guest in guests.values() if guest is not None)
        lines.append(f"  floor: that guest time totals {floor:.3f} s, {floor / qemu:.3f} of QEMU's total (the ratio "
                     f"if pykvm's own time were nil: the same kernels need it under any VMM on this KVM); pykvm's "
                     f"own, the command total less it, {command - floor:.3f} s ({(command - floor) / qemu:.3f} of "
                     f"QEMU's total: Python's start-up, building the Machine, handling exits, teardown); QEMU's "
                     f"total less the same guest time, {qemu - floor:.3f} s (its firmware, x86/run's device "
                     f"probe, QEMU's start-up)")
        return lines + self._second_floor(floor)

    def _second_floor(self, floor: float) -> list[str]:
        """The floor by a second method, from QEMU's runs alone: the time from each kernel's first output byte
        to the run's end, which QEMU's firmware and start-up do not touch."""
        kernels = {way: [self.kernel(name, way) for name in self.samples] for way in ("in-process", "qemu")}
        if any(None in times for times in kernels.values()):
            return []
        mine, theirs = (sum(time for time in kernels[way] if time is not None) for way in ("in-process", "qemu"))
        qemu = self.total("qemu")
        return [f"  cross-check of the floor, from each kernel's first output byte to the run's end (median, "
                f"summed): under QEMU {theirs:.3f} s, {theirs / qemu:.3f} of QEMU's total; under pykvm "
                f"{mine:.3f} s (the guest time above: {floor:.3f} s). Measured on QEMU's runs alone, this is "
                f"what the kernels took once they began to print, which no VMM's start-up or firmware shortens"]

    def _exits(self, name: str) -> str:
        """``name``'s time outside KVM_RUN and its exits to userspace, with the busiest sites ("" if unmeasured)."""
        measured = self.outside(name)
        if measured is None:
            return ""
        seconds, sites = measured
        exits = sum(sites.values())
        busiest = sorted(sites.items(), key=lambda item: (-item[1], item[0]))[:BUSIEST_SITES]
        return (f"; outside KVM_RUN {seconds:.3f} s, {exits} IO/MMIO exits to userspace"
                + "".join(f", {site.describe()} {count}" for site, count in busiest))

    def _cross_checks(self) -> list[str]:
        runs = [sample for ways in self.samples.values() for sample in ways["in-process"]]
        machine = sum(sample.run.elapsed or 0.0 for sample in runs)
        wall = sum(sample.wall for sample in runs)
        within = sum(sample.run.elapsed is not None and sample.run.elapsed <= sample.wall for sample in runs)
        lines = [f"  cross-check, in-process: the Machine's own clock (BootResult.elapsed, run() to the guest's "
                 f"end) sums to {machine:.3f} s of the {wall:.3f} s measured around run_pykvm() "
                 f"({machine / wall:.0%}; the rest is the cfg's expansion, building the Machine, the teardown); "
                 f"inside the measured time in {within} of {len(runs)} runs"]
        shares = ", ".join(f"{LABELS[way]} {self.total(way, cpu=True) / self.total(way):.2f}" for way in WAYS)
        lines.append(f"  cross-check, CPU time (getrusage: user + sys of this process and its children) over wall "
                     f"time: {shares}")
        by_wall, by_cpu = self.ratio(HEADLINE), self.ratio(HEADLINE, cpu=True)
        lines.append(f"  cross-check, command/QEMU by CPU time {by_cpu:.3f} against {by_wall:.3f} by wall time "
                     f"(they differ by {abs(by_cpu - by_wall) / by_wall:.0%}); in-process/QEMU by CPU time "
                     f"{self.ratio('in-process', cpu=True):.3f}")
        return lines


def qemu_binary() -> str | None:
    """The QEMU the benchmark names to x86/run: ``$QEMU``, else PATH's qemu-system-x86_64."""
    return os.environ.get("QEMU") or shutil.which("qemu-system-x86_64")


def bench_unittests(tree: Path, names: Sequence[str], rounds: int) -> int:
    """Measure, print the report; 0 when something was measured, 1 when no entry passed both, 2 for a bad tree."""
    def say(line: str) -> None:
        print(line, flush=True)
    try:
        entries = select(read_config(tree), names, None, tree)
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    load_start = os.getloadavg()
    qemu = qemu_binary()
    ways = runners(tree, qemu)
    say(f"qualifying {len(entries)} entries (one untimed run under pykvm, then under QEMU if pykvm passed):")
    kept, left_out = qualify(entries, ways, say)
    samples, dropped = measure(kept, ways, rounds, say)
    result = Result(rounds, samples, {**left_out, **dropped}, conditions(load_start, qemu))
    say("\n".join(result.report()))
    if not samples:
        print(f"{PROG}: no entry passed under both pykvm and QEMU; nothing to compare", file=sys.stderr)
        return 1
    return 0
