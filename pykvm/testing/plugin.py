"""The pytest plugin (entry point ``pytest11: pykvm``): fixtures, markers and the hardware-test rules.

Why this exists: hardware tests share the same needs everywhere: skip with a
reason where ``/dev/kvm`` or a capability is missing (and fail instead on a
machine that must have them), boot a guest in one line, never hang on a guest
that waits for an interrupt that never comes. Installing pykvm enables this
plugin in every pytest run of that environment; it stays silent unless a test
uses its fixtures or markers, and imports pykvm only then.

Fixtures: ``kvm`` (an open :class:`~pykvm.Kvm`), ``vm`` (parametrise the
irqchip with ``@pytest.mark.parametrize("vm", ["kernel"], indirect=True)``),
``vcpu``, ``guest`` (a booted image: ``@pytest.mark.guest(mode="real",
cpus=1, notify=False, irqchip="none")``, or ``indirect=True`` with a mode),
``host`` (:class:`~pykvm.hosts.HostInfo`), and the factories ``boot(mode)``
(an image on a new vCPU of the test's ``vm``) and ``machine(irqchip, cpus,
mode)`` (a new VM with booted vCPUs).

Markers: ``requires_cap(Cap.X, ...)`` skips unless KVM offers each
capability; ``host_limit("fact", ...)`` skips unless this host has each named
fact of :class:`~pykvm.hosts.HostInfo` (``sends_irq_window_exits``, ...);
``deadline(seconds)`` fails a test still running after ``seconds`` (default
``PYKVM_TEST_DEADLINE`` or 120 s) instead of letting it hang.

Environment: ``PYKVM_REQUIRE_KVM=1`` turns every skip of a hardware test into a
failure (for CI on machines that must have KVM); ``PYKVM_DEVICE`` names the
device the fixtures open (default ``/dev/kvm``).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from ..core.system import Kvm
    from ..core.vcpu import Vcpu
    from ..core.vm import Vm
    from ..guests import GuestSession
    from ..hosts import HostInfo

HARDWARE_FIXTURE = "kvm_available"
DEFAULT_DEADLINE = 120.0
_MARKERS = {
    "hardware": "needs a usable /dev/kvm (added to every test that uses a pykvm fixture)",
    "requires_cap(*caps)": "skip unless KVM offers every capability (pykvm.Cap members)",
    "host_limit(*facts)": "skip unless this host has every named HostInfo fact",
    "guest(mode='long', cpus=1, notify=False, irqchip='none')": "what the guest fixture boots",
    "deadline(seconds)": "fail the test if it is still running after this many seconds",
    "injection": "interrupt and exception injection with the userspace irqchip, checked in the guest's log "
                 "(CI runs `-m injection` on the bochs-intel host)",
    "host_independent": "a hardware test whose outcome cannot differ between KVM hosts (a lab's starter or wrong "
                        "solution, Ctrl-C handling, a command's exit status): CI runs it on one host only; "
                        "`-m 'hardware and not host_independent'` picks what can differ on a host",
}


class TestDeadlineExceeded(Exception):
    """A test ran past its ``deadline`` (raised in the test's main thread)."""


def _require_kvm(config: pytest.Config) -> bool:
    return os.environ.get("PYKVM_REQUIRE_KVM") == "1"


def device() -> str:
    """The KVM device the fixtures open: ``PYKVM_DEVICE``, else ``/dev/kvm``."""
    return os.environ.get("PYKVM_DEVICE", "/dev/kvm")


class _HardwareCount:
    """The outcomes of hardware tests, and the lost wake-ups (pykvm.irqchip.waiting.LostWakeup) the run warned.

    It counts the reports pytest logs, not the items it runs, so the count is whole under pytest-xdist too:
    the workers run the tests, and their reports and warnings reach the controlling process's hooks.
    """

    def __init__(self) -> None:
        self.counts = {"passed": 0, "failed": 0, "skipped": 0}
        self.lost_wakeups = 0
        self.seen = False

    def pytest_warning_recorded(self, warning_message: Any) -> None:
        if getattr(warning_message.category, "__name__", "") == "LostWakeup":   # by name: no pykvm import here
            self.lost_wakeups += 1

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if "hardware" not in report.keywords:
            return
        self.seen = True
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            self.counts[report.outcome] += 1


_COUNT_KEY = pytest.StashKey[_HardwareCount]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("pykvm").addoption(
        "--kvm-unit-tests", metavar="KUT_DIR", dest="kvm_unit_tests",
        help="collect each entry of KUT_DIR/x86/unittests.cfg (a built kvm-unit-tests tree) as a test booted "
             "by pykvm; alone, or beside the paths given")


def pytest_configure(config: pytest.Config) -> None:
    for marker, text in _MARKERS.items():
        config.addinivalue_line("markers", f"{marker}: {text}")
    config.stash[_COUNT_KEY] = count = _HardwareCount()
    config.pluginmanager.register(count, "pykvm-hardware-count")
    tree = config.getoption("kvm_unit_tests", None)
    if tree:
        from .kut import config_path
        cfg = str(config_path(tree))
        explicit = config.args_source == pytest.Config.ArgsSource.ARGS
        config.args[:] = [*config.args, cfg] if explicit else [cfg]


def pytest_collect_file(file_path: Any, parent: pytest.Collector) -> pytest.Collector | None:
    tree = parent.config.getoption("kvm_unit_tests", None)
    if tree and file_path.name == "unittests.cfg":
        from .kut import UnittestsCfg, config_path
        if file_path == config_path(tree):
            return UnittestsCfg.from_parent(parent, path=file_path)
    return None


def _is_hardware(item: pytest.Item) -> bool:
    names = getattr(item, "fixturenames", ())
    return HARDWARE_FIXTURE in names or any(
        item.get_closest_marker(name) is not None for name in ("requires_cap", "host_limit"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _is_hardware(item):
            item.add_marker(pytest.mark.hardware)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if item.get_closest_marker("hardware") is None:
        return
    if report.skipped and _require_kvm(item.config):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"PYKVM_REQUIRE_KVM=1 but this hardware test would skip: {reason}"


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    count = config.stash[_COUNT_KEY]
    if not count.seen:
        return
    try:
        from ..hosts import detect_vendor
        host = detect_vendor().value
    except Exception as exc:            # the summary must not hide the run's own result
        host = f"unknown ({type(exc).__name__})"
    counts = count.counts
    terminalreporter.write_line(
        f"pykvm hardware tests: {counts['passed']} passed, {counts['failed']} failed, "
        f"{counts['skipped']} skipped, {count.lost_wakeups} lost wake-ups (host: {host}, "
        f"PYKVM_REQUIRE_KVM={'1' if _require_kvm(config) else '0'})")


# -- deadlines -----------------------------------------------------------------------------
def _deadline(item: pytest.Item) -> float:
    marker = item.get_closest_marker("deadline")
    seconds: Any
    if marker is not None:
        seconds = marker.args[0] if marker.args else marker.kwargs.get("seconds")
    else:
        seconds = os.environ.get("PYKVM_TEST_DEADLINE", DEFAULT_DEADLINE)
    try:
        value = float(seconds)
    except (TypeError, ValueError):
        raise pytest.UsageError(f"{item.nodeid}: deadline({seconds!r}) needs a number of seconds") from None
    if value <= 0:
        raise pytest.UsageError(f"{item.nodeid}: deadline({seconds!r}) must be positive")
    return value


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Arm SIGALRM for the test's deadline: a vCPU in KVM_RUN on this thread gets EINTR, then the raise."""
    if item.get_closest_marker("hardware") is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    seconds = _deadline(item)

    def expired(signum: int, frame: Any) -> None:
        raise TestDeadlineExceeded(f"{item.nodeid} was still running after its deadline of {seconds:g} s "
                                   f"(mark it @pytest.mark.deadline(seconds) to allow more)")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# -- fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def kvm_available() -> None:
    """Skip (or, with PYKVM_REQUIRE_KVM=1, fail) when the KVM device cannot be used."""
    try:
        from .. import Kvm, KvmUnavailableError
    except ImportError as exc:
        pytest.skip(f"pykvm cannot be imported: {exc}")
    try:
        Kvm(device()).close()
    except KvmUnavailableError as exc:
        pytest.skip(f"no usable {device()}: {exc}")


@pytest.fixture(autouse=True)
def _pykvm_markers(request: pytest.FixtureRequest) -> None:
    """Apply requires_cap / host_limit: skip with the reason the host gives."""
    caps = [cap for marker in request.node.iter_markers("requires_cap") for cap in marker.args]
    facts = [fact for marker in request.node.iter_markers("host_limit") for fact in marker.args]
    if not caps and not facts:
        return
    request.getfixturevalue(HARDWARE_FIXTURE)
    from .. import Cap, Kvm
    from ..hosts import HostInfo, detect
    with Kvm(device()) as kvm:
        for cap in caps:
            if not kvm.check_extension(cap):
                pytest.skip(f"this host's KVM lacks KVM_CAP_{Cap(cap).name}")
    host = detect()
    for fact in facts:
        if fact not in HostInfo.__dataclass_fields__ or fact == "vendor":
            raise pytest.UsageError(f"host_limit({fact!r}): no such host fact; choose from "
                                    f"{', '.join(f for f in HostInfo.__dataclass_fields__ if f != 'vendor')}")
        behaviour = getattr(host, fact)
        if not behaviour:
            pytest.skip(f"{host.name} does not have {fact}: {behaviour.reason}")


@pytest.fixture
def kvm(kvm_available: None) -> Iterator[Kvm]:
    """An open KVM device, closed after the test."""
    from .. import Kvm
    with Kvm(device()) as handle:
        yield handle


@pytest.fixture
def host(kvm: Kvm) -> HostInfo:
    """What pykvm knows about this host: its vendor module and the facts its probes measured here."""
    from ..hosts import detect
    return detect(kvm)


@pytest.fixture
def vm(kvm: Kvm, request: pytest.FixtureRequest) -> Iterator[Vm]:
    """A VM (irqchip 'none'; ``indirect=True`` parametrisation gives the irqchip)."""
    irqchip = getattr(request, "param", "none")
    with kvm.create_vm(irqchip=irqchip) as handle:
        yield handle


@pytest.fixture
def vcpu(vm: Vm) -> Vcpu:
    """A vCPU of the test's ``vm``."""
    return vm.create_vcpu()


@pytest.fixture
def boot(vm: Vm) -> Callable[..., GuestSession]:
    """``boot(mode, notify=False)``: a guest image booted on a new vCPU of the test's ``vm``."""
    from .. import guests

    def boot_image(mode: str = "long", notify: bool = False) -> GuestSession:
        return guests.load(mode).boot(vm.create_vcpu(), notify=notify)
    return boot_image


@pytest.fixture
def machine(kvm: Kvm) -> Iterator[Callable[..., list[GuestSession]]]:
    """``machine(irqchip="kernel", cpus=1, mode="long")``: a new VM's booted sessions, one per vCPU."""
    from .. import guests
    vms: list[Vm] = []

    def make(irqchip: str = "kernel", cpus: int = 1, mode: str = "long", pit: bool = False,
             notify: bool = False) -> list[GuestSession]:
        new = kvm.create_vm(irqchip=irqchip, pit=pit)
        vms.append(new)
        return guests.boot_cpus(new, mode, cpus, notify)
    yield make
    for made in vms:
        made.close()


@pytest.fixture
def guest(kvm: Kvm, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A booted guest image: its session (one vCPU) or a tuple of sessions (``cpus`` > 1).

    Configured by ``@pytest.mark.guest(mode=..., cpus=..., notify=..., irqchip=...)`` or by
    ``indirect=True`` parametrisation with a mode name or a dict of those keywords.
    """
    from .. import guests
    options: dict[str, Any] = {}
    marker = request.node.get_closest_marker("guest")
    if marker is not None:
        options.update(dict(zip(("mode", "cpus", "notify", "irqchip"), marker.args, strict=False)))
        options.update(marker.kwargs)
    param = getattr(request, "param", None)
    if isinstance(param, str):
        options["mode"] = param
    elif isinstance(param, dict):
        options.update(param)
    unknown = set(options) - {"mode", "cpus", "notify", "irqchip"}
    if unknown:
        raise pytest.UsageError(f"guest options {sorted(unknown)} are unknown; use mode, cpus, notify, irqchip")
    with kvm.create_vm(irqchip=options.get("irqchip", "none")) as new:
        sessions = guests.boot_cpus(new, options.get("mode", "long"), options.get("cpus", 1),
                                    options.get("notify", False))
        yield sessions[0] if len(sessions) == 1 else tuple(sessions)
