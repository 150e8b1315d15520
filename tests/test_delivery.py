"""The path comparison behind the demo's section 4 and ``python -m pykvm.bench injection``.

Every path must deliver each interrupt into the guest's log (``measure``
waits for each record), and the target vCPU's stats-fd counters must show
how: the userspace kick costs a signal exit per interrupt, the kernel paths
none, and every path one injection per interrupt.
"""

import os

import pytest

from pykvm import bench, delivery, demo

COUNT = 8


@pytest.mark.parametrize("path", list(delivery.PATHS))
def test_each_path_delivers_every_interrupt(kvm, path):
    result = delivery.measure(kvm, path, COUNT)
    assert result.count == COUNT                          # one log record per injection
    # (no sign check on the latencies: under QEMU TCG the guest and host TSCs disagree, which
    # tsc_warning() reports; see test_negative_latencies_are_reported_not_hidden)
    # The guest log above is the proof of delivery. The counters show the mechanism: KVM
    # injected (kvm_amd under QEMU TCG has counted one injection fewer than deliveries in
    # some runs, so no exact count), and each delivery took the vCPU out of the guest.
    assert result.counters["irq_injections"] > 0
    assert result.counters["exits"] >= COUNT
    if path == "kick":
        # the kick is a signal; a kick that lands before KVM_RUN is taken by immediate_exit
        # instead, which KVM does not count as a signal exit
        assert result.counters["signal_exits"] >= 1
    else:
        assert result.counters["signal_exits"] == 0       # the kernel kicks without signals


@pytest.mark.parametrize("path", ["msi", "irqfd"])
def test_c_injector_baseline_delivers(kvm, path):
    result = delivery.measure_c_baseline(kvm, path, COUNT)
    assert (result.count, result.implementation) == (COUNT, "c")
    assert result.counters["irq_injections"] > 0 and result.counters["signal_exits"] == 0


def test_c_baseline_covers_only_msi_and_irqfd(kvm):
    with pytest.raises(ValueError, match="msi and irqfd"):
        delivery.measure_c_baseline(kvm, "ipi", 1)


def test_measuring_leaves_the_callers_cpu_affinity_alone(kvm):
    before = os.sched_getaffinity(0)
    delivery.measure(kvm, "msi", 2)
    assert os.sched_getaffinity(0) == before


def test_merge_adds_rounds():
    one = delivery.PathMeasurement("msi", [1000.0, 3000.0], 0.5, {"exits": 2, "signal_exits": 0,
                                                               "irq_injections": 2})
    two = delivery.PathMeasurement("msi", [2000.0], 0.5, {"exits": 4, "signal_exits": 0,
                                                       "irq_injections": 1})
    merged = delivery.PathMeasurement.merge([one, two])
    assert (merged.count, merged.rate, merged.p50_us) == (3, 3.0, 2.0)
    assert merged.exits_per_interrupt == 2.0
    assert merged.row().startswith(delivery.PATHS["msi"])


def test_demo_prints_the_path_table_with_exits_from_the_stats_fd(kvm, capsys):
    assert demo.main(["--path-count", "3"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("== 4."):out.index("== summary")]
    assert "exits/irq" in table and "failed" not in table
    for title in delivery.PATHS.values():
        row = next(line for line in table.splitlines() if line.strip().startswith(title))
        impl, rate, p50, p99, exits_per_irq, *_ = row[len("  ") + 38:].split()
        assert impl == "python" and float(rate) > 0
        assert float(exits_per_irq) >= 1.0


def test_injection_benchmark_prints_rates_latencies_and_c_ratios(kvm):
    lines = bench.bench_injection(count=4, rounds=1)
    text = "\n".join(lines)
    for path in ("msi", "irqfd"):
        assert f"{path}: Python/C  rate" in text
    assert sum(1 for line in lines if " python " in line) == len(delivery.PATHS)
    assert sum(1 for line in lines if " c      " in line) == 2


def test_negative_latencies_are_reported_not_hidden():
    skewed = delivery.PathMeasurement("msi", [-5000.0, 2000.0], 0.1, {"exits": 2})
    fine = delivery.PathMeasurement("irqfd", [1000.0], 0.1, {"exits": 1})
    assert delivery.tsc_warning([fine]) == []
    assert "1 of 3 latencies are negative" in delivery.tsc_warning([skewed, fine])[0]
