"""What a kvm-unit-tests run under pykvm prints and writes: the parity table against QEMU, TAP and JUnit XML.

Why this exists: a run is read by people (one ``run_tests.sh`` line per
entry, and with ``--qemu`` a table of where pykvm and QEMU agree and why they
do not) and by CI systems (TAP 13, JUnit XML). Each format is made here from
the same :class:`~pykvm.unittests.runner.EntryResult` records.
"""

from __future__ import annotations

import dataclasses
import re
import xml.etree.ElementTree as ElementTree
from collections import Counter
from collections.abc import Sequence

from .runner import ENDED_UNANNOUNCED, STATUS_TIMEOUT, EntryResult, Verdict

# A number in a result line: hex with or without 0x, or decimal (a word of hex digits with no digit stays).
_NUMBER = re.compile(r"\b(?:0x)?[0-9a-fA-F]*[0-9][0-9a-fA-F]*\b")


def without_numbers(line: str) -> str:
    """``line`` with every number replaced by ``#``: what stays when a test prints values it draws at run time
    (svm_npt's reserved bits come from RDRAND or the TSC)."""
    return _NUMBER.sub("#", line)


def plural(count: int, noun: str, nouns: str) -> str:
    """``1 entry``, ``3 entries``."""
    return f"{count} {noun if count == 1 else nouns}"


@dataclasses.dataclass(frozen=True)
class Parity:
    """One entry under pykvm and under QEMU, compared."""

    pykvm: EntryResult
    qemu: EntryResult

    @property
    def same_verdict(self) -> bool:
        return self.pykvm.verdict == self.qemu.verdict

    @property
    def same_lines(self) -> bool:
        return Counter(self.pykvm.results) == Counter(self.qemu.results)

    @property
    def numbers_apart(self) -> int:
        """How many lines differ only in their numbers (0 where any line differs in its words)."""
        if Counter(map(without_numbers, self.pykvm.results)) != Counter(map(without_numbers, self.qemu.results)):
            return 0
        return sum((Counter(self.pykvm.results) - Counter(self.qemu.results)).values())

    @property
    def qemu_decided(self) -> bool:
        """Whether QEMU ran the entry to a verdict: a skip, a debug-exit status (1 pass, 3 fail, 127 abort()...),
        or the guest ending without the debug exit (QEMU's -no-reboot: a reset, triple fault or power-off).

        QEMU that timed out without a KVM internal error, or that itself aborted or was killed (a status over
        128), gave no verdict to compare with.
        """
        status = self.qemu.status
        if self.qemu.verdict == Verdict.SKIP or "internal error" in self.qemu.reason \
                or self.qemu.reason == ENDED_UNANNOUNCED:
            return True
        return status is not None and status % 2 == 1 and status < 128 and status != STATUS_TIMEOUT

    @property
    def matches(self) -> bool:
        """The same verdict and the same PASS/FAIL/SKIP lines, but for the numbers in them (the statuses may
        differ, as below): each line keeps its PASS, FAIL or SKIP and its words."""
        return self.same_verdict and (self.same_lines or self.numbers_apart > 0)

    @property
    def differs(self) -> bool:
        """A difference to answer for: QEMU reached a verdict and pykvm's verdict or lines are not the same."""
        return self.qemu_decided and not self.matches

    def judgement(self) -> str:
        """'match' (with how the statuses differ, if they do), or what differs, for the table's last column."""
        if not self.qemu_decided:
            status = self.qemu.status or 0
            why = "timed out" if status == STATUS_TIMEOUT else \
                f"was ended by signal {status - 128}" if status > 128 else f"ended with status {status}"
            return f"no verdict from QEMU to compare: it {why}"
        if self.matches:
            if "internal error" in self.pykvm.reason and self.pykvm.status != self.qemu.status:
                return (f"match: KVM internal error in both; pykvm stops at once (status {self.pykvm.status}), "
                        f"QEMU waits for its timeout (status {self.qemu.status})")
            if not self.same_lines:
                return (f"match: {plural(self.numbers_apart, 'line differs', 'lines differ')} in their numbers "
                        f"only (values drawn at run time)")
            return "match"
        parts = []
        if not self.same_verdict:
            parts.append(f"verdict {self.qemu.verdict.value} under QEMU")
        if not self.same_lines:
            mine, theirs = Counter(self.pykvm.results), Counter(self.qemu.results)
            parts.append(f"lines (+{sum((mine - theirs).values())} -{sum((theirs - mine).values())} against QEMU)")
        return "differ: " + ", ".join(parts)


PARITY_LEGEND = ("status: the exit status as run_tests.sh reads it: 1 pass, 3 fail, 77 skip, 127 abort, 124 timeout\n"
                 "        (pykvm's own: 4 triple fault, 6 internal error; over 128: a signal; -: not run)\n"
                 "P/F/S: how many PASS, FAIL and SKIP lines the test printed; time: seconds")
_SIDE = ("verdict", "status", "P/F/S", "time")


def _cells(outcome: EntryResult) -> tuple[str, str, str, str]:
    counts = outcome.counts()
    return (outcome.verdict.value, "-" if outcome.status is None else str(outcome.status),
            f"{counts['PASS']}/{counts['FAIL']}/{counts['SKIP']}", f"{outcome.seconds:.1f}s")


def parity_table(rows: Sequence[Parity]) -> str:
    """A text table: entry, then QEMU's and pykvm's verdict, status, PASS/FAIL/SKIP line counts and seconds,
    then the judgement; its legend (:data:`PARITY_LEGEND`) above."""
    lines = [("", "QEMU", "", "", "", "pykvm", "", "", "", ""), ("entry", *_SIDE, *_SIDE, "judgement")]
    lines += [(row.pykvm.name, *_cells(row.qemu), *_cells(row.pykvm), row.judgement()) for row in rows]
    widths = [max(len(line[column]) for line in lines) for column in range(len(lines[0]))]
    widths[-1] = 0                      # the judgement, last, is not padded
    aligned = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
               for line in lines]
    return "\n".join([PARITY_LEGEND, *aligned])


def parity_summary(rows: Sequence[Parity]) -> str:
    """One line under the table: on how many of the entries QEMU ran to a verdict pykvm matches it, which differ,
    how many QEMU gave no verdict on, and the time under each."""
    decided = sum(row.qemu_decided for row in rows)
    differing = [row.pykvm.name for row in rows if row.differs]
    parts = [f"pykvm matches QEMU's verdict and PASS/FAIL/SKIP lines on {decided - len(differing)} of the "
             f"{plural(decided, 'entry', 'entries')} QEMU ran to a verdict"]
    if differing:
        parts.append(f"differs on {', '.join(differing)}")
    if len(rows) > decided:
        parts.append(f"no verdict from QEMU on {plural(len(rows) - decided, 'entry', 'entries')} (QEMU timed out, "
                     f"aborted or was killed: the row says which)")
    parts.append(f"QEMU {sum(row.qemu.seconds for row in rows):.1f} s, "
                 f"pykvm {sum(row.pykvm.seconds for row in rows):.1f} s")
    return "; ".join(parts)


def tap(outcomes: Sequence[EntryResult]) -> str:
    """TAP version 13, one test point per entry (a skip is ``ok ... # SKIP reason``)."""
    lines = ["TAP version 13", f"1..{len(outcomes)}"]
    for number, outcome in enumerate(outcomes, 1):
        detail = outcome.summary or (f"({outcome.reason})" if outcome.reason else "")
        if outcome.verdict == Verdict.SKIP:
            lines.append(f"ok {number} - {outcome.name} # SKIP {outcome.reason or outcome.summary}")
        else:
            ok = "ok" if outcome.verdict == Verdict.PASS else "not ok"
            lines.append(f"{ok} {number} - {outcome.name}: {detail}".rstrip(": "))
    return "\n".join(lines) + "\n"


def junit(outcomes: Sequence[EntryResult], suite: str = "kvm-unit-tests") -> str:
    """JUnit XML: a testsuite with a testcase per entry, the test's output as its system-out."""
    root = ElementTree.Element("testsuite", name=suite, tests=str(len(outcomes)),
                               failures=str(sum(o.verdict == Verdict.FAIL for o in outcomes)),
                               skipped=str(sum(o.verdict == Verdict.SKIP for o in outcomes)),
                               time=f"{sum(o.seconds for o in outcomes):.3f}")
    for outcome in outcomes:
        case = ElementTree.SubElement(root, "testcase", classname=suite, name=outcome.name,
                                      time=f"{outcome.seconds:.3f}")
        if outcome.verdict == Verdict.FAIL:
            ElementTree.SubElement(case, "failure", message=outcome.line()).text = "\n".join(
                line for line in outcome.results if line.startswith("FAIL"))
        elif outcome.verdict == Verdict.SKIP:
            ElementTree.SubElement(case, "skipped", message=outcome.reason or outcome.summary)
        if outcome.output:
            ElementTree.SubElement(case, "system-out").text = _printable(outcome.output)
    return ElementTree.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def _printable(text: str) -> str:
    """XML 1.0 has no place for most control characters a guest may print."""
    return "".join(ch if ch in "\t\n\r" or ch >= " " else f"\\x{ord(ch):02x}" for ch in text)
