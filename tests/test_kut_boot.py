"""kvm-unit-tests flats that need argv[0] on the Multiboot command line, and string IO.

Hardware tests, skipped unless ``PYKVM_KUT_DIR`` names a built kvm-unit-tests
tree (its ``x86/*.flat``). Each boots the flat as ``x86/unittests.cfg`` says
and asserts what QEMU's run of the same entry prints.
"""

from __future__ import annotations

import re

import pytest

from pykvm.vmm import Ending, Machine

TIMEOUT = 60.0
PASS = 1                # a write of 0 to the debug-exit port


@pytest.mark.parametrize("subtest", ["cpuid", "mov_from_cr8"])
def test_vmexit_runs_only_the_subtest_its_arguments_name(kvm, kut_flat, subtest):
    # unittests.cfg's vmexit_cpuid: vmexit.flat, test_args 'cpuid'. kvm-unit-tests take the first word of the
    # Multiboot command line as argv[0]: given the arguments alone, vmexit ran every subtest and hung.
    result = Machine(kut_flat("vmexit"), kvm=kvm, cmdline=subtest).run(timeout=TIMEOUT)
    assert result.ending == Ending.EXIT_PORT, f"{result.message}\n{result.text}"
    timed = [line.split()[0] for line in result.lines if re.fullmatch(r"\w+ \d+", line)]
    assert timed == [subtest], result.text              # QEMU: "cpuid 55600" and nothing else timed
    assert result.status == PASS


def test_emulator_string_out_to_the_echo_port(kvm, kut_flat):
    # emulator.c's test_stringio: rep outsb to port 0xe0, then inb gives the last byte written (DF=0 and DF=1).
    result = Machine(kut_flat("emulator"), kvm=kvm).run(timeout=TIMEOUT)
    assert "PASS: outsb up" in result.lines and "PASS: outsb down" in result.lines, result.text
