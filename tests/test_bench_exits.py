"""``python -m pykvm.bench exits``: every part of the per-exit time is measured, and the parts add up.

The loops make real exits on this host's KVM (KVM's own ``exits`` counter must have seen at least one
exit per iteration); no figure is asserted, only how the report is made from what was measured.
"""

from __future__ import annotations

import math
import statistics

import pytest

from pykvm import bench

# The benchmark's own arithmetic and loops, the same on every KVM (no host behaviour is asserted): run once.
pytestmark = pytest.mark.host_independent

ROUNDS, ITERATIONS = 3, 200


@pytest.fixture(scope="module")
def result(kvm_available):
    return bench.bench_exits(iterations=ITERATIONS, rounds=ROUNDS)


def test_every_loop_is_measured_in_every_round_on_both_clocks(result):
    assert set(result.times_us) == set(result.wall_us) == set(bench.KINDS)
    for kind in bench.KINDS:
        assert len(result.times_us[kind]) == len(result.wall_us[kind]) == ROUNDS, kind
        assert all(time > 0 for time in result.times_us[kind] + result.wall_us[kind]), kind
    assert result.exits_made == ROUNDS * len(bench.LOOPS) * ITERATIONS
    assert result.exits_counted < 0 or result.exits_counted >= result.exits_made


def test_the_parts_of_each_round_add_up_to_that_rounds_vcpu_run_time(result):
    # Each part is the difference of two loops measured in the same round: the chain starts at the C loop
    # and ends at Vcpu.run(), so one round's parts sum to its Vcpu.run() time, nothing estimated.
    assert bench.CHAIN[0].name == "c" and bench.CHAIN[-1].name == "python"
    for round_ in range(ROUNDS):
        parts = sum(result.part(index)[round_] for index in range(len(bench.CHAIN)))
        assert math.isclose(parts, result.times_us["python"][round_], rel_tol=1e-9), round_


def test_the_report_shows_each_part_and_their_sum_against_the_measured_total(result):
    report = result.report()
    parts = result.parts()
    for loop, cost in parts:
        assert f"{loop.adds:96} {cost:6.2f} us" in report
    total = sum(cost for _, cost in parts)
    assert f"the parts' sum {total:.2f} us; Vcpu.run() + check measured {result.median('python'):.2f} us" in report
    # The medians of the parts may sum away from the median total, never beyond the parts' ranges added.
    ranges = sum(max(result.part(i)) - min(result.part(i)) for i in range(len(bench.CHAIN)))
    assert abs(total - statistics.median(result.times_us["python"])) <= ranges + 1e-9
    assert f"error of the sum: +-{result.error():.2f} us" in report
    assert "ratio Vcpu.run()/bare:" in report and "in wall-clock time" in report


def test_the_hook_path_is_measured_beside_the_chain(result):
    # bench_exits checks that the hook ran once per exit of its loop (warm-up included) or raises.
    assert bench.HOOKED not in {loop.name for loop in bench.CHAIN}
    added = statistics.median(result.difference(bench.HOOKED, "python"))
    assert f"only counts here): {added:+.2f} us per exit" in result.report()
