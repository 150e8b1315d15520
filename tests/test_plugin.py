"""The pytest plugin, as a user meets it: a test file with no conftest, run by pytest in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

USER_TEST = textwrap.dedent("""
    import pytest
    from pykvm import Cap
    from pykvm.guests import Command
    from pykvm.testing import assert_delivered

    @pytest.mark.requires_cap(Cap.IRQCHIP)
    @pytest.mark.guest(mode="long", irqchip="kernel")
    def test_msi_reaches_the_guest(guest):
        guest.apic_enable()
        guest.command(Command.STI)
        guest.vcpu.vm.signal_msi(destination=0, vector=0x45)
        guest.command(Command.NOP)
        assert_delivered(guest, [(0x45, 0)])
""")


def run_pytest(tmp_path, source: str, timeout: float = 120, **environ: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_user.py").write_text(source)
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYKVM_REQUIRE_KVM", "PYKVM_DEVICE", "PYTEST_ADDOPTS")}
    env.update(environ)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           str(tmp_path / "test_user.py")], cwd=tmp_path, env=env, text=True,
                          capture_output=True, timeout=timeout)


@pytest.mark.host_independent
def test_pytest_rewrites_the_asserts_of_pykvm_testing_only(request):
    """pytest marks a plugin's whole package for assertion rewriting where it finds it on sys.path (`python -m
    pytest` from the clone): all of pykvm, each time; through the `pytest` script with an editable install it marks
    nothing. Either way the plugin leaves pykvm.testing, and only it, marked."""
    import pykvm.core.stats
    import pykvm.testing.helpers
    marked = request.config.pluginmanager.rewrite_hook._must_rewrite
    assert "pykvm" not in marked and "pykvm.testing" in marked, marked
    assert "@pytest_ar" in vars(pykvm.testing.helpers)            # its asserts report their operands
    assert "@pytest_ar" not in vars(pykvm.core.stats)             # imported from its compiled file, as it is


def test_a_user_test_file_passes_with_the_plugin_alone(kvm_available, tmp_path):
    result = run_pytest(tmp_path, USER_TEST)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout
    assert "pykvm hardware tests: 1 passed, 0 failed, 0 skipped" in result.stdout


def test_without_kvm_it_skips_with_a_reason(tmp_path):
    result = run_pytest(tmp_path, USER_TEST, PYKVM_DEVICE=str(tmp_path / "no-such-kvm"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 skipped" in result.stdout and "no usable" in result.stdout and "no-such-kvm" in result.stdout
    assert "PYKVM_DEVICE names it" in result.stdout and "this machine has no KVM" not in result.stdout


def test_without_kvm_require_kvm_fails_instead(tmp_path):
    result = run_pytest(tmp_path, USER_TEST, PYKVM_DEVICE=str(tmp_path / "no-such-kvm"),
                        PYKVM_REQUIRE_KVM="1")
    assert result.returncode == 1
    assert "1 failed" in result.stdout and "PYKVM_REQUIRE_KVM=1 but this hardware test would skip" in result.stdout


def test_require_kvm_leaves_a_skip_for_a_missing_input_a_skip(kvm_available, tmp_path):
    source = textwrap.dedent("""
        import pytest
        from pykvm.testing import skip_missing_input

        def test_needs_a_tree(kvm):
            skip_missing_input("MY_TREE is not set: it names a built tree")

        def test_needs_something_kvm_lacks(kvm):
            pytest.skip("this KVM lacks it")
    """)
    result = run_pytest(tmp_path, source, PYKVM_REQUIRE_KVM="1")
    assert "1 failed, 1 skipped" in result.stdout, result.stdout
    assert "SKIPPED" in result.stdout and "MY_TREE is not set" in result.stdout
    # the control: any other skip of a hardware test still fails
    assert "PYKVM_REQUIRE_KVM=1 but this hardware test would skip: this KVM lacks it" in result.stdout


def test_host_limit_skips_with_the_hosts_reason_and_refuses_unknown_facts(kvm_available, tmp_path, host):
    lacking = next((name for name in ("sends_irq_window_exits", "io_exit_rip_at_out", "protected_mode_iret")
                    if not getattr(host, name)), None)
    source = textwrap.dedent(f"""
        import pytest

        @pytest.mark.host_limit({lacking or "sends_irq_window_exits"!r})
        def test_needs_the_fact(kvm):
            pass

        @pytest.mark.host_limit("no_such_fact")
        def test_typo(kvm):
            pass
    """)
    result = run_pytest(tmp_path, source)
    assert "no_such_fact" in result.stdout and "no such host fact" in result.stdout
    if lacking is None:
        assert "1 passed" in result.stdout
    else:
        assert "1 skipped" in result.stdout and f"does not have {lacking}" in result.stdout


def test_a_hung_guest_fails_at_its_deadline_and_the_run_goes_on(kvm_available, tmp_path):
    # cli; hlt with the in-kernel irqchip: the vCPU sleeps in KVM_RUN and nothing wakes it;
    # the command's own timeout is off, so only the test deadline can end it.
    source = textwrap.dedent("""
        import pytest
        from pykvm.guests import Command

        @pytest.mark.deadline(1)
        @pytest.mark.guest(irqchip="kernel")
        def test_hangs(guest):
            guest.command(Command.HLT, timeout=None)

        def test_next(kvm):
            pass
    """)
    start = time.monotonic()
    result = run_pytest(tmp_path, source)
    assert time.monotonic() - start < 60
    assert "TestDeadlineExceeded" in result.stdout and "deadline of 1 s" in result.stdout
    assert "1 failed, 1 passed" in result.stdout


def test_the_control_without_a_deadline_marker_uses_the_default(kvm_available, tmp_path):
    # The same hang with PYKVM_TEST_DEADLINE=2 and no marker: the default deadline applies.
    source = textwrap.dedent("""
        from pykvm.guests import Command
        import pytest

        @pytest.mark.guest(irqchip="kernel")
        def test_hangs(guest):
            guest.command(Command.HLT, timeout=None)
    """)
    result = run_pytest(tmp_path, source, PYKVM_TEST_DEADLINE="2")
    assert "deadline of 2 s" in result.stdout and "1 failed" in result.stdout


@pytest.mark.parametrize("mode", ["real", "long"])
def test_guest_fixture_indirect_parametrisation(kvm_available, tmp_path, mode):
    source = textwrap.dedent(f"""
        import pytest
        from pykvm.guests import Command

        @pytest.mark.parametrize("guest", [{mode!r}], indirect=True)
        def test_mode(guest):
            assert guest.image.mode.value == {mode!r}
            guest.command(Command.NOP)
    """)
    result = run_pytest(tmp_path, source)
    assert "1 passed" in result.stdout, result.stdout


LOST_WAKEUP_TEST = USER_TEST + textwrap.dedent("""
    import warnings
    from pykvm.irqchip.waiting import LostWakeup

    def test_a_lost_wakeup(kvm):
        warnings.warn(LostWakeup("Command.WAIT_LOG on vCPU 0: the vCPU stayed halted for 20 s"))

    def test_not_hardware():
        pass
""")


@pytest.mark.host_independent        # the plugin's accounting
def test_the_summary_counts_lost_wakeups(kvm_available, tmp_path):
    # How pykvm reports a halted vCPU that went on only when re-entered (pykvm.irqchip.waiting): counted, not hidden.
    source = LOST_WAKEUP_TEST
    result = run_pytest(tmp_path, source)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "pykvm hardware tests: 2 passed, 0 failed, 0 skipped, 1 lost wake-ups" in result.stdout
    assert "LostWakeup: Command.WAIT_LOG on vCPU 0" in result.stdout                # in pytest's warnings summary
    strict = run_pytest(tmp_path, source, PYTEST_ADDOPTS="-W error::pykvm.irqchip.waiting.LostWakeup")
    assert strict.returncode == 1 and "1 failed, 2 passed" in strict.stdout


@pytest.mark.host_independent
def test_the_summary_counts_what_pytest_xdist_workers_ran(kvm_available, tmp_path):
    # The workers run the tests; the controlling process prints the line from their reports and warnings.
    result = run_pytest(tmp_path, LOST_WAKEUP_TEST, PYTEST_ADDOPTS="-n 2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "bringing up nodes" in result.stdout, result.stdout                   # xdist ran it
    assert "pykvm hardware tests: 2 passed, 0 failed, 0 skipped, 1 lost wake-ups" in result.stdout
    failing = run_pytest(tmp_path, LOST_WAKEUP_TEST, PYKVM_DEVICE=str(tmp_path / "no-such-kvm"),
                         PYKVM_REQUIRE_KVM="1", PYTEST_ADDOPTS="-n 2")
    assert failing.returncode == 1 and "1 passed, 2 errors" in failing.stdout, failing.stdout
    assert "pykvm hardware tests: 0 passed, 2 failed, 0 skipped, 0 lost wake-ups" in failing.stdout


@pytest.mark.parametrize("vendor, rflags, passes", [
    ("AMD", (0x46, 0x203), True),      # measured on kvm_amd under TCG: a copy taken with IF=0, beside the first
    ("AMD", (0x202, 0x203), False),    # both with IF=1: two real deliveries, still a failure
    ("PVM", (0x46, 0x203), False),     # any other host: still a failure
])
def test_assert_delivered_excuses_only_kvm_amds_redelivered_copy(monkeypatch, vendor, rflags, passes):
    from types import SimpleNamespace

    import pykvm.hosts
    from pykvm.guests.log import LogRecord
    from pykvm.hosts.vendor import VendorModule
    from pykvm.testing import assert_delivered
    monkeypatch.setattr(pykvm.hosts, "detect", lambda: SimpleNamespace(vendor=VendorModule[vendor]))
    records = [LogRecord(seq, 0x45, 0x18, None, 0x1000, flags, 0, None, 0, 0, False)
               for seq, flags in enumerate(rflags)]
    session = SimpleNamespace(records_since=lambda since: records, vcpu=SimpleNamespace(id=0))
    if passes:
        assert_delivered(session, [(0x45, 0)])
    else:
        with pytest.raises(AssertionError, match="expected"):
            assert_delivered(session, [(0x45, 0)])


# -- deadlines and what a test leaves behind -----------------------------------------------
@pytest.mark.host_independent        # no KVM at all: the plugin's own watchdog
def test_a_deadline_marker_works_without_any_pykvm_fixture(tmp_path):
    # The test touches no pykvm fixture, so it is not a hardware test: the marker alone arms the deadline.
    source = textwrap.dedent("""
        import time
        import pytest

        @pytest.mark.deadline(1)
        def test_sleeps():
            time.sleep(30)

        def test_next():
            pass
    """)
    start = time.monotonic()
    result = run_pytest(tmp_path, source, timeout=20)
    assert time.monotonic() - start < 10, result.stdout
    assert "TestDeadlineExceeded" in result.stdout and "deadline of 1 s" in result.stdout, result.stdout
    assert "1 failed, 1 passed" in result.stdout


def test_except_exception_cannot_swallow_the_deadline(kvm_available, tmp_path):
    # A test that retries a hung guest command on any Exception: the deadline must still end it, and the
    # signal that raises it ends the KVM_RUN the main thread is blocked in.
    source = textwrap.dedent("""
        import pytest
        from pykvm.guests import Command

        @pytest.mark.deadline(1)
        @pytest.mark.guest(irqchip="kernel")
        def test_retries_for_ever(guest):
            attempts = 0
            while True:
                try:
                    attempts += 1
                    guest.command(Command.HLT, timeout=None)
                except Exception as exc:
                    print("swallowed", type(exc).__name__, attempts)

        def test_next(kvm):
            pass
    """)
    # The bound is this host's own time for the same run without the hung test (the control), plus
    # the 1 s deadline and slack: under QEMU TCG pytest's start-up alone takes seconds (10.2 s in all, CI).
    start = time.monotonic()
    control = run_pytest(tmp_path, source.split("@pytest.mark.deadline(1)")[0] + "def test_next(kvm):\n    pass\n")
    baseline = time.monotonic() - start
    assert "1 passed" in control.stdout, control.stdout + control.stderr
    start = time.monotonic()
    result = run_pytest(tmp_path, source, timeout=baseline + 60)
    assert time.monotonic() - start < baseline + 1 + 5, (baseline, result.stdout)
    assert "TestDeadlineExceeded" in result.stdout and "swallowed" not in result.stdout, result.stdout
    assert "1 failed, 1 passed" in result.stdout


LEAKY_TEST = textwrap.dedent("""
    import threading
    import time
    from pykvm import x86

    def test_leaves_a_spinning_vcpu(kvm):
        vm = kvm.create_vm()                      # never closed
        vcpu = vm.create_vcpu()
        x86.load_code(vcpu, "1: jmp 1b\\n")
        def spin():
            while True:
                vcpu.run()
        threading.Thread(target=spin, name="spinner", daemon=True).start()
        while not vcpu._guard.thread:
            time.sleep(0.001)

    def test_next(kvm):
        spinners = [thread for thread in threading.enumerate() if thread.name == "spinner"]
        for thread in spinners:
            thread.join(1)
        assert [thread for thread in spinners if thread.is_alive()] == []
""")


def test_a_vm_left_open_with_a_spinning_vcpu_thread_is_an_error_and_is_ended(kvm_available, tmp_path):
    start = time.monotonic()
    result = run_pytest(tmp_path, LEAKY_TEST, timeout=30)
    assert time.monotonic() - start < 20
    assert "2 passed, 1 warning, 1 error" in result.stdout, result.stdout       # the warning: the thread's end
    assert "test_leaves_a_spinning_vcpu left Vm (fd" in result.stdout, result.stdout
    assert "vCPU 0 running on thread 'spinner'" in result.stdout, result.stdout
    assert "test_user.py::test_leaves_a_spinning_vcpu\n" in result.stdout.split("warnings summary")[1]
    tail = result.stdout.rsplit("1 error", 1)[1]
    assert "ClosedError" not in tail + result.stderr, tail + result.stderr       # nothing after the summary


def test_the_control_a_vm_closed_by_its_test_is_no_error(kvm_available, tmp_path):
    source = LEAKY_TEST.replace("vm = kvm.create_vm()                      # never closed",
                                "vm = kvm.create_vm()\n    request.addfinalizer(vm.close)").replace(
        "def test_leaves_a_spinning_vcpu(kvm):", "def test_leaves_a_spinning_vcpu(kvm, request):")
    result = run_pytest(tmp_path, source, timeout=30)
    assert "2 passed" in result.stdout and " left " not in result.stdout, result.stdout


def test_a_vcpu_thread_left_running_on_a_wider_fixtures_vm_is_an_error_and_is_ended(kvm_available, tmp_path):
    # The VM outlives the test (a module fixture's): only the vCPU the test left running is closed.
    source = LEAKY_TEST.replace("import threading", textwrap.dedent("""\
        import threading
        import pytest
        import pykvm

        @pytest.fixture(scope="module")
        def shared_vm():
            with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
                yield vm
    """)).replace("(kvm):\n    vm = kvm.create_vm()                      # never closed",
                  "(shared_vm):\n    vm = shared_vm")
    source += textwrap.dedent("""
        def test_the_vm_is_still_open(shared_vm):
            assert not shared_vm.closed and shared_vm.vcpus[0].closed
    """)
    result = run_pytest(tmp_path, source, timeout=30)
    assert "3 passed, 1 warning, 1 error" in result.stdout, result.stdout
    assert "test_leaves_a_spinning_vcpu left vCPU 0 of Vm (fd" in result.stdout, result.stdout
    assert "running on thread 'spinner'" in result.stdout


@pytest.mark.host_independent
def test_a_deadline_met_as_the_test_ends_leaves_no_alarm_behind():
    # The deadline's SIGALRM sent but not yet delivered when the test returns (held back here by blocking it):
    # once the handler before the test is back (SIG_DFL: the end of the process), it must not arrive.
    script = textwrap.dedent("""
        import signal, time
        from pykvm.testing.plugin import _Deadline
        deadline = _Deadline("test_x", 0.01)
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        with deadline:
            deadline._timer.join()              # the deadline passed and SIGALRM was sent
            assert signal.SIGALRM in signal.sigpending()
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        time.sleep(0.1)
        print("alive")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stdout) == (0, "alive\n"), (result.returncode, result.stderr)
