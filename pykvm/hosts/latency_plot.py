"""The delivery latencies of :mod:`~pykvm.hosts.delivery_latency` drawn as an SVG: a panel per target state,
one distribution per delivery path.

Why this exists: the demo's table gives each path's p50 and p99; a plot shows
the whole distribution (a kick's long tail behind a signal and a wake-up, the
kernel paths' tight one), and a page of the site can show one host's run
(``pykvm demo --plot FILE.svg``). Each series is an empirical distribution
function: for a latency x, the fraction of that path's deliveries that took
at most x, on a logarithmic axis (a latency at or below zero, which only
disagreeing TSCs give, cannot be drawn there: the legend counts them).

matplotlib draws it and is an optional extra (``pip install 'pykvm[plot]'``),
imported only here and only when a plot is asked for: :func:`check_target`
says what is missing before a run measures anything.
"""

from __future__ import annotations

from pathlib import Path

from ..core.errors import InvalidArgument
from .delivery_latency import PATHS, STATE_SHORT, STATES, Comparison, PathMeasurement

EXTRA = "plot"                   # setup.py's extras_require entry that installs matplotlib
SERIES_ID = "latency-{state}-{path}-{implementation}"    # the SVG group id of each series


class MissingExtra(InvalidArgument):
    """An optional feature asked for whose extra is not installed; the message names the extra to install."""


def check_target(target: Path, argument: str = "target") -> None:
    """Fail before any measurement if ``target`` cannot become the plot: not ``.svg``, its folder missing,
    or matplotlib not installed. ``argument`` is how the caller's user named it (the demo's ``--plot``)."""
    if target.suffix.lower() != ".svg":
        raise InvalidArgument(f"{argument} {target}: the plot is an SVG; name a file ending in .svg")
    if not target.parent.is_dir():
        raise InvalidArgument(f"{argument} {target}: the folder {target.parent} does not exist; create it "
                              f"or name a file in another")
    _require_matplotlib(target, argument)


def _require_matplotlib(target: Path, argument: str) -> None:
    try:
        import matplotlib  # noqa: F401  (only whether it imports)
    except ImportError as exc:
        raise MissingExtra(f"{argument} {target}: drawing needs matplotlib, which is not installed here "
                           f"({exc}); install pykvm's '{EXTRA}' extra: pip install 'pykvm[{EXTRA}]' (in a "
                           f"clone: pip install -e '.[{EXTRA}]')") from exc


def _label(result: PathMeasurement) -> str:
    label = f"{PATHS[result.path]}: p50 {result.p50_us:.1f} us"
    if result.implementation != "python":
        label += f" ({result.implementation})"
    hidden = sum(latency <= 0 for latency in result.latencies_ns)
    return label + (f", {hidden} at <= 0 not drawn" if hidden else "")


def draw(comparison: Comparison, target: Path, title: str, argument: str = "target") -> list[str]:
    """Write ``comparison``'s latencies to the SVG ``target`` under ``title``; the ids of the series drawn.

    Each series is an SVG group whose id is :data:`SERIES_ID` filled in; its legend entry gives the path,
    its p50 and how many deliveries could not be drawn. A path that failed in a state has no series.
    """
    states = [state for state in STATES if any(result.state == state for result in comparison.results)]
    if not states:
        raise InvalidArgument(f"{argument} {target}: the comparison holds no measurement to draw "
                              f"({len(comparison.failures)} paths failed)")
    _require_matplotlib(target, argument)
    import matplotlib
    from matplotlib.figure import Figure
    figure = Figure(figsize=(5.2 * len(states), 4.6), layout="constrained")
    axes = figure.subplots(1, len(states), sharey=True, squeeze=False)[0]
    colours = {path: f"C{index}" for index, path in enumerate(PATHS)}
    drawn = []
    for ax, state in zip(axes, states, strict=True):
        for result in (r for r in comparison.results if r.state == state):
            points = sorted(latency / 1000 for latency in result.latencies_ns if latency > 0)
            fractions = [(index + 1) / result.count for index in range(len(points))]
            (line,) = ax.step(points, fractions, where="post", color=colours[result.path],
                              linestyle="-" if result.implementation == "python" else "--", label=_label(result))
            line.set_gid(SERIES_ID.format(state=state, path=result.path, implementation=result.implementation))
            drawn.append(line.get_gid())
        ax.set_xscale("log")
        ax.set_title(STATE_SHORT[state], fontsize="medium")
        ax.set_xlabel("latency (us): host TSC at the send to the guest's vector stub")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="x-small", loc="lower right")
    axes[0].set_ylabel("fraction of deliveries at most this late")
    figure.suptitle(title, fontsize="medium")
    # Text as <text> (searchable, small), no date and fixed ids: the same data gives the same file.
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "pykvm"}):
        try:
            figure.savefig(target, format="svg", metadata={"Date": None})
        except OSError as exc:
            raise InvalidArgument(f"{argument} {target}: cannot write it ({exc.strerror}); name a file "
                                  f"you can write") from exc
    return drawn
