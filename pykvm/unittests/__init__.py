"""kvm-unit-tests on pykvm: the upstream x86 suite's entries booted by pykvm's Machine, compared with QEMU.

Why this exists: kvm-unit-tests is the hardware test suite KVM's own
developers use, and its runner needs QEMU. Given a built tree (the user's
own: ``./configure && make`` in a kvm-unit-tests checkout), this package reads
its ``x86/unittests.cfg`` (:mod:`.config`), turns each entry's QEMU
parameters into a :class:`~pykvm.vmm.Machine` or a named reason to skip
(:mod:`.plan`), runs it to the runner's verdict (:mod:`.runner`) and reports
it as the runner does, as a parity table against QEMU, as TAP or as JUnit
(:mod:`.report`). The command is ``python -m pykvm.unittests KUT_DIR``;
``pytest --kvm-unit-tests KUT_DIR`` makes each entry a test::

    from pykvm.unittests import read_config, run_pykvm
    entries = {entry.name: entry for entry in read_config(tree)}
    print(run_pykvm(entries["smptest"], tree).line())       # PASS smptest (1 tests)
"""

from .config import ConfigError, Entry, read_config
from .runner import EntryResult, Verdict, run_pykvm, run_qemu

__all__ = ["ConfigError", "Entry", "EntryResult", "Verdict", "read_config", "run_pykvm", "run_qemu"]
