"""What is specific to pykvm's own suite; the general fixtures and markers come from the pykvm pytest plugin.

The plugin (``pykvm.testing.plugin``, enabled by installing pykvm) provides
``kvm``, ``vm``, ``vcpu``, ``guest``, ``host``, ``boot`` and ``machine``, the
hardware marker, ``PYKVM_REQUIRE_KVM=1`` and the summary line counting the
hardware tests. Here: how many xdist workers, the ``kut_flat`` fixture for
tests that boot kvm-unit-tests' kernels, ``stand_in_kut_tree`` for tests of
the kvm-unit-tests runner, and three markers of this suite:

- ``kvm_unit_tests``: the test boots a kernel of the kvm-unit-tests tree that
  ``PYKVM_KUT_DIR`` names (given to every test that uses ``kut_flat``);
- ``qemu``: the test runs QEMU beside pykvm to compare them; minutes, so
  ``pyproject.toml`` leaves these out unless ``-m qemu`` asks for them;
- ``class_grading``: the test grades a class of 40 lab files (minutes), left
  out the same way unless ``-m class_grading`` asks for it.
"""

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from pykvm.testing import skip_missing_input


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kvm_unit_tests: boots a kernel of the tree PYKVM_KUT_DIR names")
    config.addinivalue_line("markers", "qemu: runs QEMU beside pykvm to compare (run with -m qemu)")
    config.addinivalue_line("markers", "class_grading: grades a class of 40 lab files (run with -m class_grading)")
    config.addinivalue_line("markers", "plot: draws with matplotlib, pykvm's `plot` extra (run with -m plot)")
    # Machine's default CPU model (qemu64, QEMU's) asks for pni, which kvm_pvm's KVM lacks: one warning per boot
    # there. tests/test_vmm_cpu_model.py checks that warning itself (pytest.warns sees it whatever this says).
    # Here, not in pyproject.toml: the ini's filters are resolved (pykvm.vmm imported) before pykvm's plugin
    # has narrowed pytest's assertion rewriting to pykvm.testing.
    config.addinivalue_line("filterwarnings", "ignore::pykvm.vmm.cpu_model.CpuFeatureWarning")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "kut_tree" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.kvm_unit_tests)


@pytest.fixture
def kut_tree() -> Path:
    """The built kvm-unit-tests tree ``PYKVM_KUT_DIR`` names; the test is marked ``kvm_unit_tests``.

    The test skips when the variable is unset (a skip even under PYKVM_REQUIRE_KVM=1: no KVM supplies the
    tree), and fails under it when the tree named is not built (a skip otherwise). CI builds it and sets it.
    """
    tree = os.environ.get("PYKVM_KUT_DIR")
    if not tree:
        skip_missing_input("PYKVM_KUT_DIR is not set: it names a built kvm-unit-tests tree (./configure && make)")
    if not Path(tree, "x86", "run").is_file():
        pytest.skip(f"PYKVM_KUT_DIR={tree} is not a built kvm-unit-tests tree (no x86/run): run ./configure && make "
                    f"there")
    return Path(tree)


@pytest.fixture
def kut_flat(kut_tree: Path) -> Callable[[str], Path]:
    """``kut_flat(name)``: ``x86/NAME.flat`` of the tree :func:`kut_tree` gives; a kernel not built there skips
    (a failure under PYKVM_REQUIRE_KVM=1: the tree given lacks it)."""
    def flat(name: str) -> Path:
        path = kut_tree / "x86" / f"{name}.flat"
        if not path.is_file():
            pytest.skip(f"{path} is not built: run make in the kvm-unit-tests tree")
        return path
    return flat


@pytest.fixture
def stand_in_kut_tree(tmp_path: Path) -> Callable[..., Path]:
    """``stand_in_kut_tree(cfg, run=None)``: a kvm-unit-tests-shaped tree whose entries boot pykvm's exitcode kernel.

    ``x86/unittests.cfg`` holds ``cfg``, ``x86/exitcode.flat`` is the kernel (its command line says how it
    ends: ``exit=N``, ``hang``), and ``run``, if given, is the script standing in for the tree's ``x86/run``.
    """
    from pykvm.vmm import testkernels

    def make(cfg: str, run: str | None = None) -> Path:
        (tmp_path / "x86").mkdir()
        (tmp_path / "x86" / "unittests.cfg").write_text(cfg)
        shutil.copyfile(testkernels.path("exitcode"), tmp_path / "x86" / "exitcode.flat")
        if run is not None:
            (tmp_path / "x86" / "run").write_text(run)
            (tmp_path / "x86" / "run").chmod(0o755)
        return tmp_path
    return make


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto`` (pyproject.toml's addopts): a worker per CPU this process may run on, and two more; none on one CPU.

    Most of the suite's time is spent waiting (a guest halted until its interrupt, a deadline, a child
    process starting, a tracefs instance or an irqchip VM released after an RCU grace period), so workers
    beyond the CPUs shorten it: on 2 CPUs (kvm_pvm, quiet, 1687 tests with kvm-unit-tests' kernels) the
    whole suite took 83.6 and 84.2 s with 4 workers, and 80.4-85 s with 6. More workers give the vCPU
    threads' host more preemptions, and each is a VM entry where kvm_pvm delivers what it holds. The tests
    assert what the host does then: an NMI held past its handler's IRET and taken at such an entry (the NMI
    probe reads KVM's exit counters, ``held_nmi_outcome``), a third level-triggered copy the IOAPIC sent
    while kvm_pvm's LAPIC EOIs at injection (the ioapic kernel exits once with interrupts on to take it), a
    late IRQ-window exit (lab 5's checker, test_queued_interrupt_waits_for_sti). Each was reproduced with four
    busy loops beside it (about 1 run in 300-750) before its fix, and not after (1500 NMI trials, 700 boots).
    On one CPU (the emulated hosts of ``python -m pykvm.hosts`` give their guest one), where every
    instruction is emulated, workers would only add their own start-up.
    """
    count = len(os.sched_getaffinity(0))
    return count + 2 if count > 1 else 0
