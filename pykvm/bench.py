"""Benchmarks that compare pykvm's Python paths with C baselines measured in the same run.

Why this exists: speed claims must be ratios against C on the same machine,
vCPU and guest, measured at the same time, because absolute times on shared
hosts are noisy. Run ``python -m pykvm.bench exits`` or ``... injection``.

``exits``: the cost of one userspace exit. The guest loops on ``out``; the C
baseline (``pykvm_bench_run_loop`` in ``csrc/pykvm_helpers.h``) calls KVM_RUN
in a tight loop; the Python side calls ``Vcpu.run()`` and checks the typed
exit. Batches of the two alternate, and both the ratio of the medians and of
the best batches are printed.

``injection``: interrupts delivered per second and p50/p99 latency (host TSC
at the inject call -> TSC at the guest's vector stub, offset removed) for
every delivery path and target state of :mod:`pykvm.delivery`, paced with
random gaps, through the same :func:`pykvm.delivery.compare` as the demo. For
the MSI and irqfd paths, the C injector (``pykvm_bench_inject``) runs against
the same guest setup in the same run, and the Python/C ratios are printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

from . import delivery, x86
from .core.binding import lib
from .core.errors import PyKvmError
from .core.exits import IoExit
from .core.system import Kvm
from .hosts import detect
from .x86 import FREE_MEMORY, assemble

BENCH_PORT = 0xE4
EXIT_LOOP_GUEST = f"""
exit_loop:
    out %al, ${BENCH_PORT:#x}
    jmp exit_loop
"""
TARGET_RATIO = 1.15


@dataclasses.dataclass
class ExitBenchResult:
    """Per-exit times in microseconds, per batch, for C and Python."""

    vendor: str
    iterations: int
    c_us: list[float]
    python_us: list[float]

    @property
    def median_ratio(self) -> float:
        return statistics.median(self.python_us) / statistics.median(self.c_us)

    @property
    def best_ratio(self) -> float:
        return min(self.python_us) / min(self.c_us)

    def report(self) -> str:
        c, py = statistics.median(self.c_us), statistics.median(self.python_us)
        verdict = "meets" if self.median_ratio <= TARGET_RATIO else "MISSES"
        return "\n".join([
            f"exits: {len(self.c_us)} alternating batches of {self.iterations} exits, host {self.vendor}",
            f"  C loop (KVM_RUN in C)        median {c:7.2f} us/exit   best {min(self.c_us):7.2f}",
            f"  Python Vcpu.run() + check    median {py:7.2f} us/exit   best {min(self.python_us):7.2f}",
            f"  Python overhead per exit     {py - c:7.2f} us",
            f"  ratio Python/C: median {self.median_ratio:.3f}, best batches {self.best_ratio:.3f} "
            f"(target <= {TARGET_RATIO}: {verdict})",
        ])


def bench_exits(iterations: int = 4000, rounds: int = 15) -> ExitBenchResult:
    """Time ``rounds`` alternating batches of ``iterations`` exits from C and from Python."""
    with Kvm() as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu()
        code = assemble(EXIT_LOOP_GUEST, "long", FREE_MEMORY)
        vm.memory.write(FREE_MEMORY, code.code)
        x86.enter_long_mode(vcpu, FREE_MEMORY)
        c_times: list[float] = []
        py_times: list[float] = []

        def c_batch() -> None:
            done = lib.pykvm_bench_run_loop(vcpu.fd, vcpu._run, iterations, BENCH_PORT)
            if done != iterations:
                raise PyKvmError(f"C loop stopped early: {done}")

        def python_batch() -> None:
            run = vcpu.run
            for _ in range(iterations):
                exit = run()
                if type(exit) is not IoExit or exit.port != BENCH_PORT:
                    raise PyKvmError(f"unexpected exit in the benchmark guest: {exit}")

        c_batch()                   # warm up both paths
        python_batch()
        for index in range(rounds):
            order = (c_batch, python_batch) if index % 2 == 0 else (python_batch, c_batch)
            for batch in order:
                start = time.perf_counter()
                batch()
                elapsed = (time.perf_counter() - start) / iterations * 1e6
                (c_times if batch is c_batch else py_times).append(elapsed)
        return ExitBenchResult(detect().name, iterations, c_times, py_times)


def bench_injection(count: int, rounds: int) -> list[str]:
    """Measure every path in every state ``rounds`` times (C baselines interleaved); the report lines.

    The same :func:`pykvm.delivery.compare` as the demo's section 4, with the
    same pacing; only the counts differ.
    """
    lines = [f"injection: {rounds} rounds x {count} paced interrupts per path and target state, each "
             f"waited for in the guest log"]
    with Kvm() as kvm:
        lines[0] += f"; host {detect().name}"
        comparison = delivery.compare(kvm, count, rounds, c_baseline=True)
    lines += ["  " + line for line in comparison.report()]
    lines.append("  C injector baseline (pykvm_bench_inject), Python/C:")
    for state in delivery.STATES:
        for path in delivery.C_PATHS:
            py, c = comparison.get(state, path), comparison.get(state, path, "c")
            if py and c:
                lines.append(f"  {delivery.STATE_SHORT[state]:28} {path:6} rate {py.rate / c.rate:.3f}   "
                             f"p50 latency {py.p50_us / c.p50_us:.3f}   p99 latency {py.p99_us / c.p99_us:.3f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pykvm.bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="benchmark", required=True)
    exits = sub.add_parser("exits", help="per-exit cost of Vcpu.run() against a C KVM_RUN loop")
    exits.add_argument("--iterations", type=int, default=4000, help="exits per batch")
    exits.add_argument("--rounds", type=int, default=15, help="batches of each kind")
    injection = sub.add_parser("injection", help="rate and latency of each interrupt delivery path, "
                                                 "with a C injector baseline for MSI and irqfd")
    injection.add_argument("--count", type=int, default=300, help="interrupts per path and state per round")
    injection.add_argument("--rounds", type=int, default=3, help="rounds (paths and states interleaved)")
    args = parser.parse_args(argv)
    try:
        if args.benchmark == "exits":
            print(bench_exits(args.iterations, args.rounds).report())
        else:
            print("\n".join(bench_injection(args.count, args.rounds)))
    except PyKvmError as exc:
        print(f"pykvm.bench: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
