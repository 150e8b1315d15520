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
``PYKVM_TEST_DEADLINE`` or 120 s, for every hardware test) instead of letting it
hang; it needs no pykvm fixture.

After each test, a VM the test opened and left open, or a vCPU still running on
a thread the test started, is an error naming what was left; the plugin closes
it, so that no vCPU thread spins on into later tests.

Environment: ``PYKVM_REQUIRE_KVM=1`` turns every skip of a hardware test into a
failure (for CI on machines that must have KVM), but for a skip made with
:func:`skip_missing_input`: the run was not given something besides KVM that the
test needs (a kvm-unit-tests tree, say), which no KVM can supply. ``PYKVM_DEVICE``
names the device the fixtures open (default ``/dev/kvm``).
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from .device import device

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


class TestDeadlineExceeded(BaseException):
    """A test ran past its ``deadline`` (raised in the test's main thread).

    A ``BaseException``, like ``KeyboardInterrupt``: a test's ``except Exception``
    (a retry loop around a hung command, say) cannot swallow it.
    """


def _require_kvm(config: pytest.Config) -> bool:
    return os.environ.get("PYKVM_REQUIRE_KVM") == "1"


class _MissingInput(pytest.skip.Exception):  # type: ignore[name-defined]
    """A skip for want of an input the run was not given (not KVM): :func:`skip_missing_input` raises it."""


def skip_missing_input(reason: str) -> None:
    """Skip this test for want of something the run was not given besides KVM, such as the folder an
    environment variable should name; ``PYKVM_REQUIRE_KVM=1`` leaves such a skip a skip.

    Example::

        import os
        from pykvm.testing import skip_missing_input

        def test_boots_my_kernel(kvm):
            if "MY_KERNEL" not in os.environ:
                skip_missing_input("MY_KERNEL is not set: it names the kernel to boot")
    """
    __tracebackhide__ = True        # the skip is reported at the test's line
    raise _MissingInput(reason)


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


def _rewrite_asserts_of_this_package_only(pluginmanager: pytest.PytestPluginManager) -> None:
    """Narrow pytest's assertion rewriting from all of pykvm to :mod:`pykvm.testing`.

    pytest marks a plugin's whole top-level package for rewriting, so each pytest
    process (each xdist worker, each pytest a test runs) rewrote pykvm's 150
    modules as it imported them, bypassing their compiled files; where
    ``PYTHONDONTWRITEBYTECODE`` is set it did so in every run. Where pytest finds
    no package in the distribution's files (the ``pytest`` script with an editable
    install), it marks nothing, and this package's asserts would go unexplained.
    Only this package holds asserts meant for a test report, so it is marked
    either way. Called as the plugin registers, before any test module imports
    pykvm. Where pytest keeps the marks differently, the marks stay as they are.
    """
    marked = getattr(getattr(pluginmanager, "rewrite_hook", None), "_must_rewrite", None)
    if isinstance(marked, set):
        marked.discard("pykvm")
        marked.add(__name__.rpartition(".")[0])


def pytest_addoption(parser: pytest.Parser, pluginmanager: pytest.PytestPluginManager) -> None:
    _rewrite_asserts_of_this_package_only(pluginmanager)
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
    if report.skipped and call.excinfo is not None and call.excinfo.errisinstance(_MissingInput):
        path, line, _ = report.longrepr        # as pytest.skip's: the reason without the class's name
        report.longrepr = (path, line, f"Skipped: {call.excinfo.value}")
        return
    if item.get_closest_marker("hardware") is None:
        return
    if report.skipped and _require_kvm(item.config):
        report.outcome = "failed"
        reason = str(report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr)
        report.longrepr = f"PYKVM_REQUIRE_KVM=1 but this hardware test would skip: {reason.removeprefix('Skipped: ')}"


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


def _armed(item: pytest.Item) -> bool:
    return item.get_closest_marker("hardware") is not None or item.get_closest_marker("deadline") is not None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Run a hardware test, or one marked ``deadline``, with its deadline armed (in the main thread only)."""
    if not _armed(item) or threading.current_thread() is not threading.main_thread():
        return (yield)
    seconds = _deadline(item)
    with _Deadline(item.nodeid, seconds):
        return (yield)


class _Deadline:
    """Raise TestDeadlineExceeded in the main thread ``seconds`` after entering, unless the block left first.

    A thread of its own waits for the deadline, then sends SIGALRM to the main
    thread alone (``pthread_kill``), whose handler raises. Not a process-wide
    timer: the kernel gives a process's signal to any thread that does not block
    it, and a vCPU thread taking it would leave a main thread blocked in
    ``KVM_RUN`` or a wait never told. Sent to the main thread, the signal is
    itself the kick that ends a ``KVM_RUN`` there (EINTR), and interrupts a
    sleep or a lock wait; a vCPU spinning on another thread is ended after the
    test, by the check of what the test left.
    """

    def __init__(self, nodeid: str, seconds: float) -> None:
        self.nodeid, self.seconds = nodeid, seconds
        self._left = threading.Event()
        self._raising = True
        self._sent = False

    def __enter__(self) -> None:
        self._previous = signal.signal(signal.SIGALRM, self._raise)
        self._timer = threading.Thread(target=self._wait, name="pykvm-test-deadline", daemon=True)
        self._timer.start()

    def __exit__(self, *exc_info: Any) -> None:
        self._raising = False
        self._left.set()
        self._timer.join()
        if self._sent:
            _discard_pending(signal.SIGALRM)
        signal.signal(signal.SIGALRM, self._previous)

    def _wait(self) -> None:
        if not self._left.wait(self.seconds):
            self._sent = True
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGALRM)

    def _raise(self, signum: int, frame: Any) -> None:
        if self._raising:
            self._raising = False
            raise TestDeadlineExceeded(f"{self.nodeid} was still running after its deadline of {self.seconds:g} s "
                                       f"(mark it @pytest.mark.deadline(seconds) to allow more)")


def _discard_pending(signum: int) -> None:
    """Take a signal sent to this thread but not yet delivered off its queue (a deadline met as the test left)."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signum})
    try:
        signal.sigtimedwait({signum}, 0)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


# -- what a test leaves behind -----------------------------------------------------------------
LEFTOVER_SAMPLE = 0.02      # seconds the vCPUs are watched for a thread inside KVM_RUN
LEFTOVER_JOIN = 1.0         # seconds a vCPU thread gets to end once its vCPU is closed
_LEFT = pytest.StashKey[list[str]]()


@pytest.fixture(autouse=True)
def _pykvm_leftovers(request: pytest.FixtureRequest) -> Iterator[None]:
    """Close the VMs a test left open and the vCPUs still running on threads it started.

    Autouse, so set up before the test's other fixtures and torn down after them:
    what the ``vm`` fixture closes is not counted. The teardown wrapper below fails
    the test with what was left; not raised here, so that pytest's last teardown
    hook still runs first and reports the exception a vCPU thread died of when its
    vCPU was closed (ClosedError) as a warning of this test.
    """
    vms_before = _open_vm_fds()
    threads_before = frozenset(thread.ident for thread in threading.enumerate())
    yield
    request.node.stash[_LEFT] = _end_leftovers(vms_before, threads_before)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    """Fail (as a teardown error) the test that left a VM open or a vCPU thread running."""
    result = yield
    left = item.stash.get(_LEFT, [])
    if left:
        pytest.fail(f"{item.name} left {'; '.join(left)}. Close every VM the test makes (`with "
                    f"kvm.create_vm() as vm:`, or the vm fixture) and stop its vCPU threads before it "
                    f"returns (pykvm.runtime.VcpuThread.cancel(), or a stop flag and vcpu.kick()); the "
                    f"plugin closed them", pytrace=False)
    return result


def _open_vm_fds() -> frozenset[int]:
    """The VM fds open now (:func:`pykvm.core.vm.open_vm_fds`); none while pykvm is not imported."""
    module = sys.modules.get("pykvm.core.vm")
    return frozenset() if module is None else module.open_vm_fds()


def _end_leftovers(vms_before: frozenset[int], threads_before: frozenset[int | None]) -> list[str]:
    """Close the VMs opened since and left open, and the vCPUs still running on threads started since.

    ``vms_before``: the VM fds open before the test. A VM fd number the test closed and then
    reused for a VM it left open counts as open before: not reported. The Vm objects are
    looked up (a walk of the garbage collector's objects) only when something was left.
    """
    threads = {thread.ident: thread for thread in threading.enumerate()
               if thread.ident not in threads_before and thread is not threading.current_thread()}
    fds = _open_vm_fds()
    if fds - vms_before:
        gc.collect()                # a VM nothing refers to any more is closed by its finaliser, not left
        fds = _open_vm_fds()
    new = fds - vms_before
    if not new and not threads:
        return []
    vms = sys.modules["pykvm.core.vm"].open_vms(fds) if fds else []
    left_vms = [vm for vm in vms if vm._fd in new]
    running = _running_vcpus([vcpu for vm in vms for vcpu in vm.vcpus], threads)
    told = [f"VM fd {fd} open, which no pykvm Vm owns (not closed by the plugin)"
            for fd in sorted(new - {vm._fd for vm in left_vms})]
    for vm in left_vms:
        told.append(f"{vm.describe()} open" + "".join(f", vCPU {vcpu.id} running on thread {threads[ident].name!r}"
                                                      for vcpu, ident in running.items() if vcpu.vm is vm))
        _close(vm, told)
    for vcpu, ident in running.items():
        if vcpu.vm not in left_vms:
            told.append(f"vCPU {vcpu.id} of {vcpu.vm.describe()} running on thread {threads[ident].name!r}")
            _close(vcpu, told)
    return told + _join([threads[ident] for ident in set(running.values())])


def _join(threads: list[threading.Thread]) -> list[str]:
    """Wait for the threads whose vCPUs were closed (their next run() raised ClosedError); name those still alive."""
    for thread in threads:
        thread.join(LEFTOVER_JOIN)
    return [f"thread {thread.name!r} still alive {LEFTOVER_JOIN:g} s after its vCPU closed"
            for thread in threads if thread.is_alive()]


def _running_vcpus(vcpus: list[Any], threads: dict[int | None, threading.Thread]) -> dict[Any, int]:
    """The vCPUs seen inside KVM_RUN on one of ``threads`` within LEFTOVER_SAMPLE s, with that thread's ident.

    Sampled: a thread looping over ``run()`` is outside KVM_RUN a moment between exits.
    """
    running: dict[Any, int] = {}
    end = time.monotonic() + LEFTOVER_SAMPLE
    while vcpus and time.monotonic() < end:
        for vcpu in vcpus:
            ident = vcpu._guard.thread
            if ident in threads:
                running[vcpu] = ident
        time.sleep(0.001)
    return running


def _close(what: Any, told: list[str]) -> None:
    try:
        what.close()
    except Exception as exc:        # noqa: BLE001 - said in the test's error, the run goes on
        told.append(f"closing {what.describe()} raised {type(exc).__name__}: {exc}")


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
        named = " (PYKVM_DEVICE names it; unset it for /dev/kvm)" if "PYKVM_DEVICE" in os.environ else ""
        pytest.skip(f"no usable {device()}{named}: {exc}")


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
    from ..hosts import explain_exit

    def boot_image(mode: str = "long", notify: bool = False) -> GuestSession:
        return guests.load(mode).boot(vm.create_vcpu(), notify=notify, explain=explain_exit)
    return boot_image


@pytest.fixture
def machine(kvm: Kvm) -> Iterator[Callable[..., list[GuestSession]]]:
    """``machine(irqchip="kernel", cpus=1, mode="long")``: a new VM's booted sessions, one per vCPU."""
    from .. import guests
    from ..hosts import explain_exit
    vms: list[Vm] = []

    def make(irqchip: str = "kernel", cpus: int = 1, mode: str = "long", pit: bool = False,
             notify: bool = False) -> list[GuestSession]:
        new = kvm.create_vm(irqchip=irqchip, pit=pit)
        vms.append(new)
        return guests.boot_cpus(new, mode, cpus, notify, explain=explain_exit)
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
    from ..hosts import explain_exit
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
                                    options.get("notify", False), explain=explain_exit)
        yield sessions[0] if len(sessions) == 1 else tuple(sessions)
