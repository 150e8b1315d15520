"""Lifecycle with vCPU threads: closing under a running vCPU, racing memory, two runners, Ctrl-C.

Each test reproduces a way a program with a vCPU thread used to die (SIGSEGV when
close() unmapped kvm_run or guest memory under a running thread, a thread left
stuck forever, two threads in one run()) and asserts what happens instead.
Subprocess tests check the process's own exit status: never a signal death.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import pykvm
from pykvm import x86
from pykvm.core.errors import ClosedError, VcpuBusyError
from pykvm.runtime import VcpuThread
from pykvm.testing import popen_interruptible

SPIN = "1: jmp 1b\n"                    # a guest that never exits by itself


def spinning_thread(vcpu: pykvm.Vcpu) -> tuple[threading.Thread, list]:
    """A thread calling vcpu.run() in a loop until run() raises; what it saw is in the list."""
    seen: list = []

    def loop() -> None:
        try:
            while True:
                seen.append(vcpu.run())
        except BaseException as exc:   # the test inspects it
            seen.append(exc)
    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while not vcpu._guard.thread and time.monotonic() < deadline:   # inside KVM_RUN
        time.sleep(0.001)
    assert vcpu._guard.thread, "the vCPU thread never entered KVM_RUN"
    return thread, seen


@pytest.mark.parametrize("what", ["vm", "vcpu"])
def test_closing_under_a_running_vcpu_kicks_it_out_and_it_sees_closed(kvm, what):
    for _ in range(10):                                  # the SIGSEGV reproduced 10 times in 10
        vm = kvm.create_vm()
        vcpu = vm.create_vcpu()
        x86.load_code(vcpu, SPIN)
        thread, seen = spinning_thread(vcpu)
        start = time.monotonic()
        (vm if what == "vm" else vcpu).close()
        thread.join(5)
        assert not thread.is_alive(), "the vCPU thread was left stuck"
        assert time.monotonic() - start < 3
        assert isinstance(seen[-1], ClosedError), seen[-1]
        vm.close()


def test_memory_access_racing_a_close_raises_instead_of_crashing(kvm):
    for _ in range(20):
        vm = kvm.create_vm()
        errors: list[BaseException] = []
        started = threading.Event()

        def reader(vm: pykvm.Vm = vm, started: threading.Event = started, errors: list = errors) -> None:
            started.set()
            try:
                while True:
                    vm.memory.read(0x10000, 4096)
            except BaseException as exc:
                errors.append(exc)
        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        started.wait()
        vm.close()
        thread.join(5)
        assert not thread.is_alive()
        assert isinstance(errors[0], ClosedError), errors


def test_a_second_thread_in_run_is_refused(vcpu):
    x86.load_code(vcpu, SPIN)
    thread, seen = spinning_thread(vcpu)
    with pytest.raises(VcpuBusyError, match="already running on another thread"):
        vcpu.run()
    vcpu.close()
    thread.join(5)
    assert isinstance(seen[-1], ClosedError)


def test_the_control_one_thread_runs_again_and_again(vcpu):
    # Without a second thread, consecutive runs on one thread are never refused.
    x86.load_code(vcpu, "1: out %al, $0x10\n jmp 1b\n")
    for _ in range(100):
        assert vcpu.run().port == 0x10


def test_run_on_a_closed_vcpu_is_a_closed_error(vcpu):
    vcpu.close()
    with pytest.raises(ClosedError):
        vcpu.run()
    with pytest.raises(ClosedError):
        vcpu.kick()


def test_a_vcpu_thread_error_does_not_leave_the_vcpu_running(kvm):
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu()
        x86.load_code(vcpu, SPIN)
        def loop(stopping: threading.Event) -> None:
            while not stopping.is_set():
                vcpu.run()
        thread = VcpuThread(vcpu, loop)
        time.sleep(0.05)
        thread.cancel()
        assert not thread.running


def run_python(source: str, *, interrupt_after: float | None = None) -> subprocess.CompletedProcess[str]:
    process = popen_interruptible([sys.executable, "-c", textwrap.dedent(source)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if interrupt_after is not None:
        for line in process.stdout:               # wait until the script says it is spinning
            if line.startswith("spinning"):
                break
        time.sleep(interrupt_after)
        process.send_signal(signal.SIGINT)
    try:
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:          # never leave a spinning child behind
            process.kill()
            process.communicate()
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


CTRL_C_SCRIPT = """
    import threading, time, pykvm
    from pykvm import x86
    kvm = pykvm.Kvm()
    vm = kvm.create_vm()
    threads = []
    for _ in range(2):
        vcpu = vm.create_vcpu()
        x86.load_code(vcpu, "1: jmp 1b\\n")
        def loop(vcpu=vcpu):
            while True:
                vcpu.run()
        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        threads.append(thread)
    print("spinning", flush=True)
    while True:
        time.sleep(0.01)
"""


def test_ctrl_c_with_vcpu_threads_running_ends_with_a_traceback_not_a_signal_death(kvm_available):
    # Python ends an unhandled KeyboardInterrupt by re-raising SIGINT (status 130 in a shell), as a
    # Ctrl-C'd program should; a crash would be SIGSEGV (-11) or SIGABRT (-6).
    result = run_python(CTRL_C_SCRIPT, interrupt_after=0.2)
    assert result.returncode == -signal.SIGINT, (result.returncode, result.stderr[-2000:])
    assert "KeyboardInterrupt" in result.stderr and "Segmentation" not in result.stderr


def test_an_exception_with_vcpu_threads_running_exits_cleanly(kvm_available):
    script = CTRL_C_SCRIPT.replace("""while True:
        time.sleep(0.01)""", """time.sleep(0.2)
    raise RuntimeError("the test's own failure")""")
    start = time.monotonic()
    result = run_python(script)
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    assert "RuntimeError: the test's own failure" in result.stderr
    assert time.monotonic() - start < 20


def test_pytest_goes_on_after_a_test_fails_while_a_vcpu_thread_spins(kvm_available, tmp_path):
    (tmp_path / "test_user.py").write_text(textwrap.dedent("""
        import threading
        from pykvm import x86

        def test_fails_with_a_spinning_thread(vm):
            vcpu = vm.create_vcpu()
            x86.load_code(vcpu, "1: jmp 1b\\n")
            threading.Thread(target=lambda: [vcpu.run() for _ in iter(int, 1)], daemon=True).start()
            assert False, "the test's own failure"

        def test_next(kvm):
            pass
    """))
    env = {key: value for key, value in os.environ.items() if key != "PYTEST_ADDOPTS"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_user.py"],
                            cwd=tmp_path, env=env, text=True, capture_output=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr        # failed tests, no crash (139)
    assert "1 failed, 1 passed" in result.stdout, result.stdout
