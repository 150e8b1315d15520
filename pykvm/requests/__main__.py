"""``python -m pykvm.requests``: KVM's requests on this host, measured; ``show NAME`` for one timeline.

List mode prints one row per KVM_REQ_*: where KVM makes it and handles it,
pykvm's trigger, the kind of evidence and this host's verdict, measured now.
``show NAME`` runs that request's scenario and prints its timeline (host
actions, exits, stats deltas, trace events, what the guest saw), the control
run without the trigger, and what the request is for. ``--json`` for machines.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap

from ..command import description, invoked_as
from ..exit_status import exit_with, run_command
from ..hosts.vendor import detect_vendor
from . import BY_NAME, OBSERVED, REQUESTS, Row, run_request
from .scenarios import SCENARIOS, ScenarioResult


def _list(as_json: bool, min_observed: int) -> int:
    vendor = detect_vendor()
    rows = [run_request(request, vendor) for request in REQUESTS]
    observed = sum(row.verdict == OBSERVED for row in rows)
    if as_json:
        json.dump({"host": vendor.value, "observed": observed, "requests": [row.as_dict() for row in rows]},
                  sys.stdout, indent=1)
        print()
    else:
        print(f"KVM's requests on {vendor.value} (verdicts measured now; `show NAME` for a timeline)\n")
        for row in rows:
            _print_row(row)
        counts: dict[str, int] = {}
        for row in rows:
            counts[row.verdict] = counts.get(row.verdict, 0) + 1
        print(f"{len(rows)} requests: " + ", ".join(f"{count} {verdict}" for verdict, count in counts.items()))
    if observed < min_observed:
        print(f"pykvm.requests: {observed} requests observed on {vendor.value}, fewer than --min-observed "
              f"{min_observed}", file=sys.stderr)
        return 1
    return 0


def _print_row(row: Row) -> None:
    r = row.request
    print(f"KVM_REQ_{r.name}")
    print(f"    made in    {r.made_in}\n    handled in {r.handled_in}")
    print(f"    trigger    {r.trigger}\n    evidence   {r.evidence or '-'}")
    print(f"    verdict    {row.verdict}" + (f" ({row.why})" if row.why and row.verdict != OBSERVED else ""))


def _print_outcome(outcome: ScenarioResult, title: str) -> None:
    print(f"{title}: {outcome.verdict}" + (f" ({outcome.why})" if outcome.why else ""))
    for number, step in enumerate(outcome.steps, 1):
        print(f"  {number:2}. {step.kind:6} {step.text}")


def _show(name: str, as_json: bool) -> int:
    key = name.upper().removeprefix("KVM_REQ_")
    request = BY_NAME.get(key)
    if request is None:
        print(f"unknown request {name!r}; choose one of: {', '.join(BY_NAME)}", file=sys.stderr)
        return 2
    scenario = SCENARIOS.get(key)
    if scenario is None:
        row = run_request(request)
        print(f"KVM_REQ_{key}: {row.verdict} ({row.why})")
        print(textwrap.fill(request.explanation, 96))
        return 0
    outcome, control = scenario(), scenario(control=True)
    if as_json:
        json.dump({"host": detect_vendor().value, "request": key, "outcome": outcome.as_dict(),
                   "control": control.as_dict(), "explanation": request.explanation}, sys.stdout, indent=1)
        print()
        return 0
    print(f"KVM_REQ_{key} on {detect_vendor().value}")
    print(f"  made in {request.made_in}; handled in {request.handled_in}\n")
    _print_outcome(outcome, "with the trigger")
    print()
    _print_outcome(control, "control, without it")
    print()
    print(textwrap.fill(request.explanation, 96))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=invoked_as("pykvm.requests"), description=description(__doc__))
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--min-observed", type=int, default=0, metavar="N",
                        help="exit with status 1 when fewer than N requests are observed (for CI)")
    sub = parser.add_subparsers(dest="command")
    show = sub.add_parser("show", help="run one request's scenario and print its timeline")
    show.add_argument("name", help="e.g. MMU_FREE_OBSOLETE_ROOTS")
    show.add_argument("--json", action="store_true", dest="show_json", help="print JSON")
    args = parser.parse_args(argv)
    if args.command == "show":
        return run_command("pykvm requests", lambda: _show(args.name, args.json or args.show_json))
    return run_command("pykvm requests", lambda: _list(args.json, args.min_observed))


if __name__ == "__main__":
    exit_with(main())
