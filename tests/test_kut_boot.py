"""kvm-unit-tests flats that need argv[0] on the Multiboot command line, and string IO.

Hardware tests, skipped unless ``PYKVM_KUT_DIR`` names a built kvm-unit-tests
tree (its ``x86/*.flat``). Each boots the flat as ``x86/unittests.cfg`` says
and asserts what QEMU's run of the same entry prints.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from pykvm.vmm import Ending, Machine

TIMEOUT = 60.0
PASS = 1                # a write of 0 to the debug-exit port


def flat(name: str) -> Path:
    tree = os.environ.get("PYKVM_KUT_DIR")
    if not tree:
        pytest.skip("PYKVM_KUT_DIR is not set: no kvm-unit-tests tree to boot")
    path = Path(tree) / "x86" / f"{name}.flat"
    if not path.is_file():
        pytest.skip(f"x86/{name}.flat is not built in PYKVM_KUT_DIR")
    return path


@pytest.mark.parametrize("subtest", ["cpuid", "mov_from_cr8"])
def test_vmexit_runs_only_the_subtest_its_arguments_name(kvm, subtest):
    # unittests.cfg's vmexit_cpuid: vmexit.flat, test_args 'cpuid'. kvm-unit-tests take the first word of the
    # Multiboot command line as argv[0]: given the arguments alone, vmexit ran every subtest and hung.
    result = Machine(flat("vmexit"), kvm=kvm, cmdline=subtest).run(timeout=TIMEOUT)
    assert result.ending == Ending.EXIT_PORT, f"{result.message}\n{result.text}"
    timed = [line.split()[0] for line in result.lines if re.fullmatch(r"\w+ \d+", line)]
    assert timed == [subtest], result.text              # QEMU: "cpuid 55600" and nothing else timed
    assert result.status == PASS


def test_emulator_string_out_to_the_echo_port(kvm):
    # emulator.c's test_stringio: rep outsb to port 0xe0, then inb gives the last byte written (DF=0 and DF=1).
    result = Machine(flat("emulator"), kvm=kvm).run(timeout=TIMEOUT)
    assert "PASS: outsb up" in result.lines and "PASS: outsb down" in result.lines, result.text
