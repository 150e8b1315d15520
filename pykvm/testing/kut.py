"""``pytest --kvm-unit-tests KUT_DIR``: each entry of a kvm-unit-tests tree's unittests.cfg as a pytest test.

Why this exists: a team that runs its KVM hardware tests under pytest wants
kvm-unit-tests in the same run and the same reports (JUnit, ``-k``, xdist).
The plugin (:mod:`.plugin`) adds the option and hands the tree's
``x86/unittests.cfg`` to this collector: one item per entry, booted by
:func:`pykvm.unittests.run_pykvm`. The entry's PASS is a pass; its SKIP a
skip with the runner's reason; its FAIL a failure showing the runner's line,
the test's FAIL lines and the end of its output (the whole output is in the
report's "kvm-unit-tests output" section).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

OPTION = "--kvm-unit-tests"
TAIL = 40           # output lines shown in a failure


class KutFailure(Exception):
    """An entry's FAIL under pykvm: the runner's line and the evidence."""


def config_path(tree: str) -> Path:
    path = Path(tree).resolve() / "x86" / "unittests.cfg"
    if not path.is_file():
        raise pytest.UsageError(f"{OPTION} {tree}: {path} does not exist; name the top folder of a built "
                                f"kvm-unit-tests tree (./configure && make there)")
    return path


class UnittestsCfg(pytest.File):
    """The tree's x86/unittests.cfg: an item per entry."""

    def collect(self) -> Iterator[pytest.Item]:
        from ..unittests import read_config
        for entry in read_config(self.path.parent.parent):
            yield KutEntry.from_parent(self, name=entry.name, entry=entry)


class KutEntry(pytest.Item):
    """One unittests.cfg entry, booted by pykvm."""

    def __init__(self, *, entry: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.entry = entry

    def runtest(self) -> None:
        from ..core.errors import KvmUnavailableError
        from ..core.system import Kvm
        from ..unittests import Verdict, run_pykvm
        from .device import device
        try:
            Kvm(device()).close()
        except KvmUnavailableError as exc:
            if os.environ.get("PYKVM_REQUIRE_KVM") == "1":
                raise KutFailure(f"PYKVM_REQUIRE_KVM=1 but {device()} cannot be used: {exc}") from None
            pytest.skip(f"no usable {device()}: {exc}")
        outcome = run_pykvm(self.entry, self.path.parent.parent)
        if outcome.output:
            self.add_report_section("call", "kvm-unit-tests output", outcome.output)
        if outcome.verdict == Verdict.SKIP:
            pytest.skip(outcome.line())
        if outcome.verdict == Verdict.FAIL:
            failed = [line for line in outcome.results if line.startswith("FAIL")]
            tail = outcome.output.splitlines()[-TAIL:]
            raise KutFailure("\n".join([outcome.line(), *failed, f"-- the last {len(tail)} lines it printed:",
                                        *tail]))

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, KutFailure):
            return str(excinfo.value)
        return str(super().repr_failure(excinfo))

    def reportinfo(self) -> tuple[Path, int, str]:
        return self.path, 0, f"kvm-unit-tests: {self.name}"
