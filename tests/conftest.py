"""What is specific to pykvm's own suite; every fixture and marker comes from the pykvm pytest plugin.

The plugin (``pykvm.testing.plugin``, enabled by installing pykvm) provides
``kvm``, ``vm``, ``vcpu``, ``guest``, ``host``, ``boot`` and ``machine``, the
hardware marker, ``PYKVM_REQUIRE_KVM=1`` and the summary line counting the
hardware tests.
"""

import os

import pytest


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto`` (pyproject.toml's addopts): a worker per CPU this process may run on, and none on one CPU.

    On one CPU (the emulated hosts of ``python -m pykvm.hosts`` give their guest one) a single worker
    would only add its own start-up to the run.
    """
    count = len(os.sched_getaffinity(0))
    return count if count > 1 else 0
