"""benchmarks of pykvm against baselines measured in the same run: C for its paths, QEMU for booting kernels.

Why this exists: speed claims must be ratios against C on the same machine,
vCPU and guest, measured at the same time, because absolute times on shared
hosts are noisy. Run ``python -m pykvm.bench exits`` or ``... injection``
(``... boot`` and ``... unittests KUT_DIR`` compare pykvm with QEMU instead:
:mod:`pykvm.vmm.bench`, :mod:`pykvm.unittests.bench`).

``exits``: the cost of one userspace exit, and where it goes. The guest
loops on ``out``; seven loops make the same exits on one vCPU, five of them
a chain, each adding one layer to the one before it: the C loop (``pykvm_bench_run_loop`` in
``csrc/pykvm_helpers.h``: KVM_RUN and the exit reason, nothing else), the
same in C through the run guard (``pykvm_bench_guarded_loop``: the guard
taken, the thread published for kicks, the guard given back, the IO exit
packed), a Python loop calling that guarded KVM_RUN through cffi, the same
plus the decode to a typed ``IoExit`` and the caller's check, and
``Vcpu.run()`` with the same check. Beside them, the bare loop calls KVM_RUN
through cffi and reads the exit reason, the floor for any Python driver, the
baseline of the targets; ``Vcpu.run()`` with a do-nothing ``irq_controller``
shows what the hook path adds (the hook counts its calls, checked against
the loop's exits). Each round times every loop in rotating order; a
part's cost is the per-round difference of two neighbouring loops, so the
parts of one round add up to that round's ``Vcpu.run()`` time exactly, and
their medians to the median within the error printed. Times are the loop
thread's CPU time (``time.thread_time``; the guest's time inside KVM_RUN
counts, time the thread waited for a CPU does not), so another process on the
machine moves the figures less; the wall-clock ratios of the same batches are
printed too. KVM's own ``exits`` counter cross-checks that each iteration was
one exit.

``injection``: interrupts delivered per second and p50/p99 latency (host TSC
at the inject call -> TSC at the guest's vector stub, offset removed) for
every delivery path and target state of :mod:`pykvm.hosts.delivery_latency`, paced with
random gaps, through the same :func:`pykvm.hosts.delivery_latency.compare` as the demo. For
the MSI and irqfd paths, the C injector (``pykvm_bench_inject``) runs against
the same guest setup in the same run, and the Python/C ratios are printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from pathlib import Path

from . import x86
from .command import description, invoked_as
from .core.binding import lib
from .core.constants import Cap, ExitReason
from .core.errors import PyKvmError
from .core.exits import Exit, IoExit
from .core.system import Kvm
from .exit_status import exit_with, run_command
from .hosts import delivery_latency, detect

BENCH_PORT = 0xE4
EXIT_LOOP_GUEST = f"""
exit_loop:
    out %al, ${BENCH_PORT:#x}
    jmp exit_loop
"""
TARGET_VS_BARE = 1.10      # Vcpu.run() + check against the bare cffi loop (the Python floor)
TARGET_VS_C = 1.20         # ... and against the C loop


@dataclasses.dataclass(frozen=True)
class ExitLoop:
    """One loop of the exits benchmark: what it runs per exit, and what it adds to the loop before it."""

    name: str
    label: str
    adds: str           # the part of the per-exit time this loop adds to the previous one in LOOPS ("" for bare)


# The chain, each loop one layer on the one before it (the first is KVM_RUN alone); then the bare baseline.
LOOPS = (
    ExitLoop("c", "C loop (KVM_RUN in C)", "KVM_RUN itself, in a C loop"),
    ExitLoop("c_guarded", "C loop through the run guard", "the run guard in C: taken, thread published for "
                                                           "kicks, given back, IO exit packed"),
    ExitLoop("cffi_guarded", "guarded KVM_RUN through cffi", "the cffi call from a Python loop (GIL released "
                                                             "and retaken, arguments converted)"),
    ExitLoop("decoded", "... + typed IoExit + check", "the decode to a typed IoExit, and the caller's check"),
    ExitLoop("python", "Vcpu.run() + check", "Vcpu.run() itself: method call, irq_controller hook check, "
                                             "exit sequence, the guard's finally"),
    ExitLoop("bare", "bare cffi KVM_RUN + exit_reason", ""),
    ExitLoop("hooked", "Vcpu.run() + hook + check", ""),
)
CHAIN = tuple(loop for loop in LOOPS if loop.adds)
HOOKED = "hooked"     # Vcpu.run() with a do-nothing irq_controller: the hook path (guard taken in Python, the call)
KINDS = tuple(loop.name for loop in LOOPS)


@dataclasses.dataclass
class ExitBenchResult:
    """Per-exit times in microseconds, one per round, for every loop of :data:`LOOPS`.

    ``times_us``: the loop thread's CPU time; ``wall_us``: wall-clock time of the same batches.
    """

    vendor: str
    iterations: int
    times_us: dict[str, list[float]]
    wall_us: dict[str, list[float]]
    exits_counted: int          # KVM's own ``exits`` statistic over every batch (-1: no stats fd)
    exits_made: int
    load: float                 # the host's 1-minute load average when the measurement began

    def median(self, kind: str) -> float:
        return statistics.median(self.times_us[kind])

    def ratio(self, kind: str, baseline: str, clock: str = "cpu") -> float:
        """Median of the per-round ratios ``kind / baseline`` (each round times every loop in turn)."""
        times = self.times_us if clock == "cpu" else self.wall_us
        return statistics.median(a / b for a, b in zip(times[kind], times[baseline], strict=True))

    def part(self, index: int) -> list[float]:
        """Per round, what ``CHAIN[index]`` adds to the loop before it (for the first: its whole time)."""
        loop = self.times_us[CHAIN[index].name]
        if index == 0:
            return list(loop)
        return self.difference(CHAIN[index].name, CHAIN[index - 1].name)

    def difference(self, kind: str, baseline: str) -> list[float]:
        """Per round, ``kind``'s time minus ``baseline``'s (us per exit)."""
        return [a - b for a, b in zip(self.times_us[kind], self.times_us[baseline], strict=True)]

    def parts(self) -> list[tuple[ExitLoop, float]]:
        """Each part of :data:`CHAIN` with the median of its per-round costs (us per exit)."""
        return [(loop, statistics.median(self.part(index))) for index, loop in enumerate(CHAIN)]

    def error(self) -> float:
        """How far the parts' medians may sum from the total's median: their half-interquartile ranges added."""
        spread = 0.0
        for index in range(len(CHAIN)):
            samples = self.part(index)
            if len(samples) >= 2:
                quartiles = statistics.quantiles(samples, n=4)
                spread += (quartiles[2] - quartiles[0]) / 2
        return spread

    def report(self) -> str:
        c, bare, py = (self.median(kind) for kind in ("c", "bare", "python"))
        vs_bare, vs_c, floor = self.ratio("python", "bare"), self.ratio("python", "c"), self.ratio("bare", "c")

        def verdict(ratio: float, target: float) -> str:
            return f"target <= {target}: {'meets' if ratio <= target else 'MISSES'}"
        counted = ("not available (no stats fd)" if self.exits_counted < 0 else
                   f"{self.exits_counted} of {self.exits_made} exits seen by KVM's own 'exits' counter")
        lines = [f"exits: {len(self.times_us['c'])} rounds of {self.iterations} exits per loop, the {len(LOOPS)} "
                 f"loops in rotating order each round; host {self.vendor}, one vCPU, guest `out` in a loop; "
                 f"load average {self.load:.2f} at the start; the loop thread's CPU time per exit"]
        lines += [f"  {loop.label:34} median {self.median(loop.name):7.2f} us/exit   best "
                  f"{min(self.times_us[loop.name]):7.2f}" for loop in LOOPS]
        lines += [
            f"  Python cost per exit over bare     {py - bare:7.2f} us",
            f"  ratio bare/C (the floor for any Python driver): {floor:.3f}",
            f"  ratio Vcpu.run()/bare: {vs_bare:.3f} ({verdict(vs_bare, TARGET_VS_BARE)})",
            f"  ratio Vcpu.run()/C:    {vs_c:.3f} ({verdict(vs_c, TARGET_VS_C)})",
            f"  the same ratios in wall-clock time: Vcpu.run()/bare {self.ratio('python', 'bare', 'wall'):.3f}, "
            f"Vcpu.run()/C {self.ratio('python', 'c', 'wall'):.3f}",
            f"  an irq_controller attached (Vcpu.run() takes the guard itself, calls before_entry(), which "
            f"only counts here): {statistics.median(self.difference(HOOKED, 'python')):+.2f} us per exit",
            "  where one exit's time goes (each part: the per-round difference of two loops above, median):"]
        parts = self.parts()
        lines += [f"    {'' if index == 0 else '+ '}{loop.adds:96} {cost:6.2f} us"
                  for index, (loop, cost) in enumerate(parts)]
        total = sum(cost for _, cost in parts)
        lines += [f"    = the parts' sum {total:.2f} us; Vcpu.run() + check measured {py:.2f} us (difference "
                  f"{total - py:+.2f} us; error of the sum: +-{self.error():.2f} us, the parts' half-interquartile "
                  f"ranges added)",
                  f"  cross-check: {counted}"]
        return "\n".join(lines)


def bench_exits(iterations: int = 4000, rounds: int = 15) -> ExitBenchResult:
    """Time ``rounds`` rounds of every loop of :data:`LOOPS`, ``iterations`` exits each."""
    with Kvm() as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu()
        x86.load_code(vcpu, EXIT_LOOP_GUEST)
        run_struct, fd, guard = vcpu._run_c, vcpu.fd, vcpu._guard
        stats = vcpu.stats if kvm.check_extension(Cap.BINARY_STATS_FD) else None
        packed_io = lib.PYKVM_PACKED_IO
        hook = CountingHook()

        def check_c(done: int) -> None:
            if done != iterations:
                raise PyKvmError(f"C loop stopped early: {done}")

        def c_batch() -> None:
            check_c(lib.pykvm_bench_run_loop(fd, run_struct, iterations, BENCH_PORT))

        def c_guarded_batch() -> None:
            check_c(lib.pykvm_bench_guarded_loop(fd, run_struct, guard, iterations, BENCH_PORT))

        def bare_batch() -> None:      # KVM_RUN through cffi and one field read: no pykvm at all
            kvm_run, io = lib.pykvm_run, int(ExitReason.IO)
            for _ in range(iterations):
                if kvm_run(fd, run_struct) != io:
                    raise PyKvmError("unexpected exit in the benchmark guest")

        def cffi_guarded_batch() -> None:
            run_guarded = lib.pykvm_run_guarded
            for _ in range(iterations):
                if run_guarded(fd, run_struct, guard, 0) <= packed_io:
                    raise PyKvmError("unexpected exit in the benchmark guest")

        def decoded_batch() -> None:
            run_guarded, decode = lib.pykvm_run_guarded, IoExit.from_packed
            for sequence in range(iterations):
                result = run_guarded(fd, run_struct, guard, 0)
                if result <= packed_io:
                    raise PyKvmError("unexpected exit in the benchmark guest")
                check(decode(vcpu, sequence, result))

        def python_batch() -> None:
            run = vcpu.run
            for _ in range(iterations):
                check(run())

        def hooked_batch() -> None:
            vcpu.irq_controller = hook
            try:
                python_batch()
            finally:
                vcpu.irq_controller = None

        batches = {"c": c_batch, "c_guarded": c_guarded_batch, "cffi_guarded": cffi_guarded_batch,
                   "decoded": decoded_batch, "python": python_batch, "bare": bare_batch, HOOKED: hooked_batch}
        for batch in batches.values():              # warm up every path
            batch()
        times: dict[str, list[float]] = {kind: [] for kind in KINDS}
        wall: dict[str, list[float]] = {kind: [] for kind in KINDS}
        load = os.getloadavg()[0]
        before = stats.read()["exits"] if stats is not None else 0
        for index in range(rounds):
            shift = index % len(KINDS)
            for kind in KINDS[shift:] + KINDS[:shift]:
                start, start_cpu = time.perf_counter(), time.thread_time()
                batches[kind]()
                times[kind].append((time.thread_time() - start_cpu) / iterations * 1e6)
                wall[kind].append((time.perf_counter() - start) / iterations * 1e6)
        counted = int(stats.read()["exits"]) - int(before) if stats is not None else -1
        if hook.entries != (rounds + 1) * iterations:
            raise PyKvmError(f"the irq_controller hook ran {hook.entries} times for {(rounds + 1) * iterations} exits")
        return ExitBenchResult(detect().name, iterations, times, wall, counted, rounds * len(KINDS) * iterations,
                               load)


class CountingHook:
    """An irq_controller whose hook only counts its calls: what the hook path itself costs."""

    def __init__(self) -> None:
        self.entries = 0

    def before_entry(self) -> None:
        self.entries += 1


def check(exit: Exit) -> None:
    """The check every Python loop of the benchmark makes on its exit: an OUT to the benchmark's port."""
    if type(exit) is not IoExit or exit.port != BENCH_PORT:
        raise PyKvmError(f"unexpected exit in the benchmark guest: {exit}")


def bench_injection(count: int, rounds: int) -> list[str]:
    """Measure every path in every state ``rounds`` times (C baselines interleaved); the report lines.

    The same :func:`pykvm.hosts.delivery_latency.compare` as the demo's section 4, with the
    same pacing; only the counts differ.
    """
    lines = [f"injection: {rounds} rounds x {count} paced interrupts per path and target state, each "
             f"waited for in the guest log"]
    with Kvm() as kvm:
        lines[0] += f"; host {detect().name}"
        comparison = delivery_latency.compare(kvm, count, rounds, c_baseline=True)
    lines += ["  " + line for line in comparison.report()]
    lines.append("  C injector baseline (pykvm_bench_inject), Python/C:")
    for state in delivery_latency.STATES:
        for path in delivery_latency.C_PATHS:
            py, c = comparison.get(state, path), comparison.get(state, path, "c")
            if py and c:
                lines.append(f"  {delivery_latency.STATE_SHORT[state]:28} {path:6} rate {py.rate / c.rate:.3f}   "
                             f"p50 latency {py.p50_us / c.p50_us:.3f}   p99 latency {py.p99_us / c.p99_us:.3f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=invoked_as("pykvm.bench"), description=description(__doc__))
    sub = parser.add_subparsers(dest="benchmark", required=True)
    exits = sub.add_parser("exits", help="per-exit cost of Vcpu.run() against a C KVM_RUN loop, "
                                                "and where its time goes")
    exits.add_argument("--iterations", type=int, default=4000, help="exits per batch")
    exits.add_argument("--rounds", type=int, default=15, help="batches of each kind")
    injection = sub.add_parser("injection", help="rate and latency of each interrupt delivery path, "
                                                 "with a C injector baseline for MSI and irqfd")
    injection.add_argument("--count", type=int, default=300, help="interrupts per path and state per round")
    injection.add_argument("--rounds", type=int, default=3, help="rounds (paths and states interleaved)")
    boot = sub.add_parser("boot", help="time to the first serial byte and to exit, hello kernel, pykvm and QEMU")
    boot.add_argument("--rounds", type=int, default=10, help="boots of each kind")
    unittests = sub.add_parser("unittests", help="kvm-unit-tests entries' wall time under pykvm against QEMU "
                                                 "(the tree's x86/run), on the entries both PASS")
    unittests.add_argument("tree", metavar="KUT_DIR", help="a built kvm-unit-tests tree (./configure && make)")
    unittests.add_argument("tests", nargs="*", metavar="TEST", help="entries to measure (default: all of them)")
    unittests.add_argument("--rounds", type=int, default=3, help="timed runs of each entry each way")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: expected at least one round")

    def body() -> int:
        print(f"pykvm bench {args.benchmark}: measuring on this machine's KVM ...", flush=True)
        if args.benchmark == "exits":
            print(bench_exits(args.iterations, args.rounds).report())
        elif args.benchmark == "boot":
            from .vmm.bench import bench_boot
            print("\n".join(bench_boot(args.rounds)))
        elif args.benchmark == "unittests":
            from .unittests.bench import bench_unittests
            return bench_unittests(Path(args.tree).resolve(), args.tests, args.rounds)
        else:
            print("\n".join(bench_injection(args.count, args.rounds)))
        return 0
    return run_command("pykvm bench", body)


if __name__ == "__main__":
    exit_with(main())
