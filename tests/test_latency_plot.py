"""``pykvm demo --plot FILE.svg``: the path comparison's latencies drawn as an SVG, one series per path and state.

The SVG is read back as XML: each series is a group whose id names its state, path and implementation
(:data:`pykvm.hosts.latency_plot.SERIES_ID`), and its legend entry carries the p50 the demo's table prints.
matplotlib is an optional extra: without it the demo stops before measuring, with an error that names the
extra to install. The tests that draw are marked ``plot``: pytest leaves them out unless asked (``-m plot``,
with ``pip install -e '.[test,plot]'``), as CI does in a virtualenv of its own.
"""

from __future__ import annotations

import os
import re
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from pykvm import demo
from pykvm.core.errors import InvalidArgument
from pykvm.hosts import delivery_latency, latency_plot
from pykvm.hosts.delivery_latency import PATHS, STATES, Comparison, PathMeasurement

SVG = "{http://www.w3.org/2000/svg}"


def series_ids(svg: Path) -> set[str]:
    root = ElementTree.parse(svg).getroot()
    assert root.tag == f"{SVG}svg"
    return {group.get("id", "") for group in root.iter(f"{SVG}g") if group.get("id", "").startswith("latency-")}


def texts(svg: Path) -> list[str]:
    return ["".join(text.itertext()) for text in ElementTree.parse(svg).getroot().iter(f"{SVG}text")]


def measured(path: str, state: str, latencies_us: list[float]) -> PathMeasurement:
    latencies = [latency * 1000 for latency in latencies_us]
    return PathMeasurement(path, state, latencies, [latency + 5000 for latency in latencies],
                           {name: len(latencies) for name in delivery_latency.COUNTERS})


def comparison(results: list[PathMeasurement], failures: tuple[tuple[str, str, str], ...] = ()) -> Comparison:
    return Comparison(results, list(failures), 4, 1, delivery_latency.PACING)


@pytest.mark.host_independent
@pytest.mark.plot
def test_each_path_in_each_state_is_one_series(tmp_path):
    results = [measured(path, state, [10.0 + index, 20.0, 30.0, 400.0])
               for index, path in enumerate(PATHS) for state in STATES]
    target = tmp_path / "latency.svg"
    drawn = latency_plot.draw(comparison(results), target, "a title")
    expected = {f"latency-{state}-{path}-python" for path in PATHS for state in STATES}
    assert series_ids(target) == set(drawn) == expected
    shown = texts(target)
    assert "a title" in shown
    assert f"{PATHS['kick']}: p50 {results[0].p50_us:.1f} us" in shown


@pytest.mark.host_independent
@pytest.mark.plot
def test_a_failed_path_has_no_series_and_undrawable_latencies_are_counted(tmp_path):
    # The control for the test above: the same drawing with one path failed and one latency <= 0.
    results = [measured("msi", "halted", [-1.0, 0.0, 12.0, 13.0]), measured("kick", "halted", [50.0, 60.0])]
    target = tmp_path / "latency.svg"
    latency_plot.draw(comparison(results, (("halted", "irqfd", "no eventfd"),)), target, "t")
    assert series_ids(target) == {"latency-halted-msi-python", "latency-halted-kick-python"}
    assert f"{PATHS['msi']}: p50 6.0 us, 2 at <= 0 not drawn" in texts(target)


@pytest.mark.host_independent
def test_nothing_measured_is_refused(tmp_path):
    with pytest.raises(InvalidArgument, match="holds no measurement to draw"):
        latency_plot.draw(comparison([], (("halted", "msi", "broken"),)), tmp_path / "x.svg", "t")
    assert not (tmp_path / "x.svg").exists()


@pytest.mark.host_independent
@pytest.mark.parametrize("argv, words", [
    (["--plot", "{tmp}/latency.png"], "the plot is an SVG; name a file ending in .svg"),
    (["--plot", "{tmp}/missing/latency.svg"], "/missing does not exist; create it"),
    (["--plot", "{tmp}/latency.svg", "--path-count", "0"], "--path-count 0 skips; give --path-count N > 0"),
])
def test_a_plot_the_demo_cannot_draw_is_refused_before_it_runs(tmp_path, capsys, argv, words):
    assert demo.main([arg.format(tmp=tmp_path) for arg in argv]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "InvalidArgument" in err and words in err, err     # no VM ran
    assert not any(tmp_path.rglob("*.svg"))


@pytest.mark.host_independent
def test_without_matplotlib_the_demo_names_the_extra_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)         # `import matplotlib` now fails
    target = tmp_path / "latency.svg"
    assert demo.main(["--plot", str(target)]) == 1
    out, err = capsys.readouterr()
    assert out == "", out                                         # stopped before the first VM
    assert "MissingExtra" in err and "install pykvm's 'plot' extra: pip install 'pykvm[plot]'" in err, err
    assert not target.exists()
    with pytest.raises(latency_plot.MissingExtra):
        latency_plot.draw(comparison([measured("msi", "halted", [1.0])]), target, "t")


def _table_p50s(out: str) -> set[str]:
    """The legend entries the demo's table implies: each row's path title and its p50 column."""
    table = out[out.index("== 5."):out.index("== summary")]
    entries = set()
    for line in table.splitlines():
        row = line.strip()
        title = next((title for title in PATHS.values() if row.startswith(title + " ")), None)
        if title and "failed:" not in row:
            implementation, _rate, p50 = row[len(title):].split()[:3]
            assert implementation == "python"
            entries.add(f"{title}: p50 {p50} us")
    return entries


@pytest.mark.plot
def test_demo_plot_draws_what_its_table_reports(kvm, tmp_path, capsys):
    target = tmp_path / "latency.svg"
    assert demo.main(["--path-count", "3", "--plot", str(target)]) == 0
    out = capsys.readouterr().out
    states = [state for state in STATES if state == "same_cpu" or len(os.sched_getaffinity(0)) >= 2]
    assert series_ids(target) == {f"latency-{state}-{path}-python" for state in states for path in PATHS}
    legend = {re.sub(r", \d+ at <= 0 not drawn$", "", text) for text in texts(target) if ": p50 " in text}
    assert legend == _table_p50s(out)
    assert f"drawn into {target}: {len(PATHS) * len(states)} latency distributions" in out
