"""``python -m pykvm.unittests KUT_DIR [TEST ...]``: kvm-unit-tests' x86 suite booted by pykvm, no QEMU needed.

Why this exists: engineers who test KVM hosts already have a hardware test
suite, kvm-unit-tests, and its runner needs QEMU. This reads the tree's own
``x86/unittests.cfg`` and boots each entry's kernel with pykvm's Machine,
printing one line per entry in the runner's own words. ``--qemu`` runs the
same entries under QEMU too (through the tree's ``x86/run``) and prints a
parity table; ``--tap`` and ``--junit`` write reports for CI systems.

Exit status: 0 when no entry failed under pykvm (passes and skips only), 1
when one did (with ``--qemu``: when an entry compared differs from QEMU's
verdict or PASS/FAIL/SKIP lines), 2 for a bad command line or tree, 130 on
Ctrl-C. (The tree's ``run_tests.sh`` itself exits 0 whatever its tests did.)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import difflib
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ..command import description, invoked_as
from ..exit_status import exit_with, run_command
from .config import ConfigError, Entry, read_config
from .report import Parity, junit, parity_summary, parity_table, plural, tap
from .runner import EntryResult, Verdict, run_pykvm, run_qemu

PROG = "pykvm unittests"


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=invoked_as("pykvm.unittests"), description=description(__doc__),
                                     epilog="exit status: 0 no failure, 1 a failure under pykvm, 2 bad usage, "
                                            "130 Ctrl-C")
    parser.add_argument("tree", metavar="KUT_DIR", help="a built kvm-unit-tests tree (./configure && make)")
    parser.add_argument("tests", nargs="*", metavar="TEST",
                        help="entries to run (default: all of them), or a built x86/TEST.flat the cfg lacks")
    parser.add_argument("-g", "--group", help="only the entries of this group (also runs its nodefault ones)")
    parser.add_argument("-j", "--jobs", type=int, default=1, metavar="N", help="entries run at once (default 1)")
    parser.add_argument("--timeout", type=float, metavar="S", help="every entry's timeout (default: the cfg's)")
    parser.add_argument("--qemu", nargs="?", const="", metavar="BINARY",
                        help="also run entries under QEMU (the tree's x86/run; BINARY, else PATH's "
                             "qemu-system-x86_64), print a parity table, and exit 1 where they differ "
                             "instead of where pykvm failed; a word after --qemu is taken as BINARY, so "
                             "write --qemu=BINARY, or --qemu after KUT_DIR and the TESTs")
    parser.add_argument("--qemu-where", choices=("all", "failed"), default="all",
                        help="with --qemu: every entry (all), or only those that failed under pykvm (failed: "
                             "a failure QEMU shares, with the same lines, is the host's, not pykvm's)")
    parser.add_argument("--tap", metavar="FILE", help="write pykvm's results as TAP 13")
    parser.add_argument("--junit", metavar="FILE", help="write pykvm's results as JUnit XML")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each test's output under its line")
    parser.add_argument("-l", "--list", action="store_true", help="list the selected entries and exit")
    return parser


def select(entries: Sequence[Entry], names: Sequence[str], group: str | None,
           tree: Path | None = None) -> list[Entry]:
    """The entries named (in the cfg's order, then kernels outside it), or all; only ``group``'s if given.

    A name the cfg lacks but ``tree`` has built as ``x86/NAME.flat`` (such as ``dummy``) runs
    as the tree's ``x86/run x86/NAME.flat`` would: one vCPU, no arguments, the cfg's timeout.
    """
    known = {entry.name for entry in entries}
    kernels = [Entry(name=name, file=f"{name}.flat") for name in names
               if name not in known and tree is not None and (tree / "x86" / f"{name}.flat").is_file()]
    unknown = [name for name in names if name not in known and name not in {kernel.name for kernel in kernels}]
    if unknown:
        close = {name: difflib.get_close_matches(name, known, n=3) for name in unknown}
        hints = "; ".join(f"{name!r}" + (f" (did you mean {', '.join(match)}?)" if match else "")
                          for name, match in close.items())
        raise ConfigError(f"no such entry in x86/unittests.cfg, nor a built x86/NAME.flat: {hints}; "
                          "--list shows the entries")
    chosen = [entry for entry in entries if not names or entry.name in names] + kernels
    selected = [entry for entry in chosen if group is None or group in entry.groups]
    if not selected:
        raise ConfigError(_why_none(entries, names, group))
    return selected


def _why_none(entries: Sequence[Entry], names: Sequence[str], group: str | None) -> str:
    """Why ``select`` chose no entry, and what to write instead: a run of no entries is never a success."""
    groups = sorted({name for entry in entries for name in entry.groups})
    if group is None:
        return "x86/unittests.cfg has no [NAME] entries to run; name a tree whose cfg lists its tests"
    if group not in groups:
        close = difflib.get_close_matches(group, groups, n=3)
        return (f"-g {group}: no entry of x86/unittests.cfg is in that group"
                + (f" (did you mean {', '.join(close)}?)" if close else "")
                + f"; the groups its 'groups =' lines name: {', '.join(groups) or 'none'}")
    return (f"-g {group}: none of the entries named ({', '.join(names)}) is in that group; drop -g to run "
            f"them, or name entries of the group (--list -g {group} lists them)")


def _qemu_binary(value: str) -> str:
    """``--qemu``'s BINARY as an absolute path (x86/run runs in the tree), or a usage error that says how
    ``--qemu`` took it: ``--qemu KUT_DIR TEST`` makes KUT_DIR the binary and TEST the tree."""
    found = shutil.which(value)
    if found is None:
        what = "a folder" if os.path.isdir(value) else "no executable file (nor a command on PATH)"
        parser().error(f"--qemu {value}: taken as QEMU's binary, and it is {what}; put --qemu after KUT_DIR "
                       f"and the TESTs (or before another option), or name a binary as --qemu=BINARY")
    return os.path.abspath(found)


def _runner(args: argparse.Namespace, tree: Path) -> Callable[[Entry], tuple[EntryResult, EntryResult | None]]:
    def run(entry: Entry) -> tuple[EntryResult, EntryResult | None]:
        mine = run_pykvm(entry, tree, args.timeout, args.group)
        compare = args.qemu is not None and (args.qemu_where == "all" or mine.verdict == Verdict.FAIL)
        return mine, run_qemu(entry, tree, args.timeout, args.group, args.qemu or None) if compare else None
    return run


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_intermixed_args(argv)     # options between KUT_DIR and the TESTs too
    if args.jobs < 1:
        parser().error(f"-j {args.jobs}: run at least one entry at a time")
    if args.timeout is not None and not 0 < args.timeout < float("inf"):
        parser().error(f"--timeout {args.timeout}: expected a finite number of seconds > 0")
    if args.qemu:
        args.qemu = _qemu_binary(args.qemu)
    tree = Path(args.tree).resolve()

    def body() -> int:
        try:
            entries = select(read_config(tree), args.tests, args.group, tree)
        except ConfigError as exc:
            print(f"{PROG}: {exc}", file=sys.stderr)
            return 2
        if args.list:
            for entry in entries:
                print(entry.name)
            return 0
        outcomes: list[EntryResult] = []
        parities: list[Parity] = []
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for mine, theirs in pool.map(_runner(args, tree), entries):
                outcomes.append(mine)
                print(mine.line(), flush=True)
                if args.verbose and mine.output:
                    print("\n".join(f"  | {line}" for line in mine.output.splitlines()), flush=True)
                if theirs is not None:
                    parities.append(Parity(mine, theirs))
        if parities:
            print()
            print(parity_table(parities))
        if args.tap:
            Path(args.tap).write_text(tap(outcomes))
        if args.junit:
            Path(args.junit).write_text(junit(outcomes))
        counts = {verdict: sum(o.verdict == verdict for o in outcomes) for verdict in Verdict}
        lacking = sum(o.reason.startswith("pykvm lacks") for o in outcomes)
        print(f"{PROG}: {counts[Verdict.PASS]} passed, {counts[Verdict.FAIL]} failed, "
              f"{counts[Verdict.SKIP]} skipped ({lacking} for what pykvm lacks) under pykvm, "
              f"{plural(len(outcomes), 'entry', 'entries')} of {tree / 'x86' / 'unittests.cfg'}")
        if args.qemu is None:
            return 1 if counts[Verdict.FAIL] else 0
        print(f"{PROG}: {parity_summary(parities)}" if parities else
              f"{PROG}: QEMU ran no entry: --qemu-where {args.qemu_where} and none failed under pykvm")
        return 1 if any(row.differs for row in parities) else 0
    return run_command(PROG, body)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    exit_with(main())
