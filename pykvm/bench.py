"""Benchmarks that compare pykvm's Python paths with C baselines measured in the same run.

Why this exists: speed claims must be ratios against C on the same machine,
vCPU and guest, measured at the same time, because absolute times on shared
hosts are noisy. Run ``python -m pykvm.bench exits`` or ``... injection``
(``... boot`` and ``... unittests KUT_DIR`` compare pykvm with QEMU instead:
:mod:`pykvm.vmm.bench`, :mod:`pykvm.unittests.bench`).

``exits``: the cost of one userspace exit. The guest loops on ``out``; the C
baseline (``pykvm_bench_run_loop`` in ``csrc/pykvm_helpers.h``) calls KVM_RUN
in a tight loop; the bare loop calls KVM_RUN through cffi and reads the exit
reason, the floor for any Python driver; the pykvm loop calls ``Vcpu.run()``
and checks the typed exit. Each round times the three in rotating order; the
ratios are medians of the per-round ratios, and KVM's own ``exits`` counter
cross-checks that each iteration was one exit.

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
import statistics
import time
from pathlib import Path

from . import x86
from .command import description, invoked_as
from .core.binding import lib
from .core.constants import Cap, ExitReason
from .core.errors import PyKvmError
from .core.exits import IoExit
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
KINDS = ("c", "bare", "python")


@dataclasses.dataclass
class ExitBenchResult:
    """Per-exit times in microseconds, per batch: the C loop, a bare cffi loop, and ``Vcpu.run()``."""

    vendor: str
    iterations: int
    times_us: dict[str, list[float]]
    exits_counted: int          # KVM's own ``exits`` statistic over every batch (None: no stats fd)
    exits_made: int

    def median(self, kind: str) -> float:
        return statistics.median(self.times_us[kind])

    def ratio(self, kind: str, baseline: str) -> float:
        """Median of the per-round ratios ``kind / baseline`` (each round times all three in turn)."""
        return statistics.median(a / b for a, b in zip(self.times_us[kind], self.times_us[baseline],
                                                       strict=True))

    def report(self) -> str:
        c, bare, py = (self.median(kind) for kind in KINDS)
        vs_bare, vs_c, floor = self.ratio("python", "bare"), self.ratio("python", "c"), self.ratio("bare", "c")

        def verdict(ratio: float, target: float) -> str:
            return f"target <= {target}: {'meets' if ratio <= target else 'MISSES'}"
        counted = ("not available (no stats fd)" if self.exits_counted < 0 else
                   f"{self.exits_counted} of {self.exits_made} exits seen by KVM's own 'exits' counter")
        return "\n".join([
            f"exits: {len(self.times_us['c'])} rounds of {self.iterations} exits per loop, the three loops "
            f"in rotating order each round; host {self.vendor}, one vCPU, guest `out` in a loop",
            f"  C loop (KVM_RUN in C)            median {c:7.2f} us/exit   best {min(self.times_us['c']):7.2f}",
            f"  bare cffi KVM_RUN + exit_reason  median {bare:7.2f} us/exit   best {min(self.times_us['bare']):7.2f}",
            f"  Vcpu.run() + check               median {py:7.2f} us/exit   best {min(self.times_us['python']):7.2f}",
            f"  Python cost per exit over bare   {py - bare:7.2f} us",
            f"  ratio bare/C (the floor for any Python driver): {floor:.3f}",
            f"  ratio Vcpu.run()/bare: {vs_bare:.3f} ({verdict(vs_bare, TARGET_VS_BARE)})",
            f"  ratio Vcpu.run()/C:    {vs_c:.3f} ({verdict(vs_c, TARGET_VS_C)})",
            f"  cross-check: {counted}",
        ])


def bench_exits(iterations: int = 4000, rounds: int = 15) -> ExitBenchResult:
    """Time ``rounds`` rounds of the C, bare-cffi and ``Vcpu.run()`` loops, ``iterations`` exits each."""
    with Kvm() as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu()
        x86.load_code(vcpu, EXIT_LOOP_GUEST)
        run_struct, fd = vcpu._run_c, vcpu.fd
        stats = vcpu.stats if kvm.check_extension(Cap.BINARY_STATS_FD) else None

        def c_batch() -> None:
            done = lib.pykvm_bench_run_loop(fd, run_struct, iterations, BENCH_PORT)
            if done != iterations:
                raise PyKvmError(f"C loop stopped early: {done}")

        def bare_batch() -> None:      # KVM_RUN through cffi and one field read: no pykvm at all
            kvm_run, io = lib.pykvm_run, int(ExitReason.IO)
            for _ in range(iterations):
                if kvm_run(fd, run_struct) != io:
                    raise PyKvmError("unexpected exit in the benchmark guest")

        def python_batch() -> None:
            run = vcpu.run
            for _ in range(iterations):
                exit = run()
                if type(exit) is not IoExit or exit.port != BENCH_PORT:
                    raise PyKvmError(f"unexpected exit in the benchmark guest: {exit}")

        batches = {"c": c_batch, "bare": bare_batch, "python": python_batch}
        for batch in batches.values():              # warm up every path
            batch()
        times: dict[str, list[float]] = {kind: [] for kind in KINDS}
        before = stats.read()["exits"] if stats is not None else 0
        for index in range(rounds):
            for kind in KINDS[index % 3:] + KINDS[:index % 3]:
                start = time.perf_counter()
                batches[kind]()
                times[kind].append((time.perf_counter() - start) / iterations * 1e6)
        counted = int(stats.read()["exits"]) - int(before) if stats is not None else -1
        return ExitBenchResult(detect().name, iterations, times, counted, rounds * 3 * iterations)


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
    exits = sub.add_parser("exits", help="per-exit cost of Vcpu.run() against a C KVM_RUN loop")
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
