"""Shared fixtures: KVM availability, host detection, booted guests.

Hardware tests carry the ``hardware`` marker (via the ``kvm`` fixture). They
skip with a reason when ``/dev/kvm`` cannot be used, except with
``PYKVM_REQUIRE_KVM=1``, where such a skip is turned into a failure. The
terminal summary says how many hardware tests ran.
"""

from __future__ import annotations

import os

import pytest

import pykvm
from pykvm import guests

REQUIRE_KVM = os.environ.get("PYKVM_REQUIRE_KVM") == "1"
_hardware = {"passed": 0, "failed": 0, "skipped": 0}


def pytest_configure(config):
    config.addinivalue_line("markers", "hardware: needs a usable /dev/kvm")


def pytest_collection_modifyitems(items):
    for item in items:
        if "kvm_available" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.hardware)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if item.get_closest_marker("hardware") is None:
        return
    if report.skipped and REQUIRE_KVM:
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"PYKVM_REQUIRE_KVM=1 but this hardware test would skip: {reason}"
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _hardware[report.outcome] += 1


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(
        f"pykvm hardware tests: {_hardware['passed']} passed, {_hardware['failed']} failed, "
        f"{_hardware['skipped']} skipped (host: {pykvm.detect_host().name}, "
        f"PYKVM_REQUIRE_KVM={'1' if REQUIRE_KVM else '0'})")


@pytest.fixture(scope="session")
def kvm_available() -> None:
    try:
        pykvm.Kvm().close()
    except pykvm.KvmUnavailableError as exc:
        pytest.skip(f"no usable /dev/kvm: {exc}")


@pytest.fixture
def kvm(kvm_available):
    with pykvm.Kvm() as kvm:
        yield kvm


@pytest.fixture
def host(kvm) -> pykvm.HostInfo:
    return pykvm.detect_host()


@pytest.fixture
def vm(kvm):
    with kvm.create_vm() as vm:
        yield vm


@pytest.fixture
def vcpu(vm):
    return vm.create_vcpu()


@pytest.fixture
def boot(vm):
    """``boot(mode, notify=False)``: a GuestSession on a fresh vCPU of the test's VM."""
    def boot_image(mode: str, notify: bool = False) -> guests.GuestSession:
        return guests.load(mode).boot(vm.create_vcpu(), notify=notify)
    return boot_image


@pytest.fixture
def machine(kvm):
    """``machine(irqchip="kernel", cpus=1, mode="long")``: booted GuestSessions, one per vCPU of a new VM."""
    vms = []

    def make(irqchip: str = "kernel", cpus: int = 1, mode: str = "long", **vm_options):
        vm = kvm.create_vm(irqchip=irqchip, **vm_options)
        vms.append(vm)
        return guests.boot_cpus(vm, mode, cpus)
    yield make
    for vm in vms:
        vm.close()
