"""Object lifecycle and bad input on a real /dev/kvm: typed errors, no leaks, no crashes."""

import errno
import gc
import os
import subprocess
import sys
import weakref

import psutil
import pytest

import pykvm
from pykvm import Cap, x86
from pykvm.core import system
from pykvm.core.errors import (
    CapabilityMissing,
    ClosedError,
    GuestMemoryError,
    InvalidArgument,
    InvalidVector,
    KvmError,
    KvmUnavailableError,
    MemorySlotOverlap,
    NotReadyForInjection,
)
from pykvm.core.ioctls import Ioctl
from pykvm.core.vm import open_vm_fds, open_vms
from pykvm.injection import Injector


def test_objects_report_what_kvm_says(kvm):
    assert kvm.api_version == 12
    assert kvm.vcpu_mmap_size >= 4096
    assert kvm.check_extension(Cap.USER_MEMORY) > 0
    assert any(entry.function == 0x80000001 for entry in kvm.supported_cpuid)


def test_create_vm_defaults_give_memory_at_zero(kvm):
    with kvm.create_vm() as vm:
        (slot,) = vm.memory.slots
        assert slot.guest_phys_addr == 0 and slot.size == 16 << 20
        vm.memory.write_u64(0x1234, 0x1122334455667788)
        assert vm.memory.read(0x1234, 8) == bytes.fromhex("8877665544332211")
        assert vm.memory.read_u32(0x1238) == 0x11223344


def test_open_vms_are_found_from_their_fds_and_nothing_keeps_a_dropped_one(kvm):
    vm = kvm.create_vm(memory_size=0)
    fd = vm.fd
    assert fd in open_vm_fds() and vm in open_vms()
    dropped = weakref.ref(kvm.create_vm(memory_size=0))     # pykvm holds no reference: the finaliser closes it
    gc.collect()
    assert dropped() is None and open_vms() == [vm]
    vm.close()
    assert fd not in open_vm_fds() and open_vms() == []


AT_EXIT_SCRIPT = """
import atexit, threading, time
atexit.register(lambda: print("closed at exit:", vm.closed, flush=True))  # runs after pykvm's (LIFO)
import pykvm, pykvm.core.vm
from pykvm import x86
vm = pykvm.Kvm().create_vm()
vcpu = vm.create_vcpu()
x86.load_code(vcpu, "1: hlt\\njmp 1b\\n")        # an exit to read each time: the run guard is often held
threading.Thread(target=lambda: [vcpu.run() for _ in iter(int, 1)], daemon=True).start()
time.sleep(0.1)
"""


@pytest.mark.parametrize("hook", [True, False], ids=["closed", "control-without-the-hook"])
def test_a_vm_left_open_is_closed_at_exit_while_its_vcpu_thread_runs(kvm_available, hook):
    script = AT_EXIT_SCRIPT if hook else AT_EXIT_SCRIPT.replace(
        "time.sleep(0.1)", "time.sleep(0.1)\natexit.unregister(pykvm.core.vm._close_open_vms)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and f"closed at exit: {hook}" in done.stdout, (done.stdout, done.stderr[-2000:])


def test_close_is_idempotent_and_use_after_close_raises(kvm):
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu()
    view = vcpu.kvm_run
    vm.close()
    vm.close()
    assert vm.closed and vcpu.closed
    with pytest.raises(ClosedError, match="was closed with its Vm"):
        vcpu.run()
    with pytest.raises(ClosedError, match="was closed with its Vm"):
        vcpu.regs
    with pytest.raises(ClosedError):
        view.ready_for_interrupt_injection
    with pytest.raises(ClosedError):
        view.request_interrupt_window = 1
    with pytest.raises(ClosedError):
        vm.memory.read(0, 1)
    with pytest.raises(ClosedError):
        vm.create_vcpu()
    with pytest.raises(ClosedError):
        vcpu.interrupt(0x20)
    with pytest.raises(ClosedError):
        Injector(vcpu).interrupt(0x20)
    assert "closed" in repr(vcpu) and "closed" in repr(view)
    # the control: a vCPU closed alone does not blame its VM
    alone = kvm.create_vm()
    single = alone.create_vcpu()
    single.close()
    with pytest.raises(ClosedError, match="Vcpu 0 is closed; create a new one"):
        single.regs
    alone.close()


def test_exit_kept_after_close_stays_readable_but_cannot_reply(vm):
    vcpu = vm.create_vcpu()
    x86.load_code(vcpu, "in $0x60, %al\n")
    exit = vcpu.run()
    assert isinstance(exit, pykvm.IoExit) and exit.port == 0x60 and not exit.is_out
    vcpu.close()
    assert exit.port == 0x60
    with pytest.raises(ClosedError):
        exit.reply(0x41)


def test_stale_exit_reply_is_refused(vm):
    vcpu = vm.create_vcpu()
    x86.load_code(vcpu, "1: in $0x60, %al\n out %al, $0x61\n jmp 1b\n")
    first = vcpu.run()
    first.reply(0x5A)
    echoed = vcpu.run()
    assert echoed.port == 0x61 and echoed.value == 0x5A   # the IN data reached the guest
    with pytest.raises(pykvm.StaleExitError):
        first.reply(0x5A)


def test_vector_out_of_range(vcpu):
    for vector in (256, -1, 1000):
        with pytest.raises(InvalidVector, match="0..255"):
            vcpu.interrupt(vector)


def test_interrupt_refused_before_guest_is_ready(vcpu):
    with pytest.raises(NotReadyForInjection, match="request_interrupt_window"):
        Injector(vcpu).interrupt(0x20)          # no exit yet: nothing reported ready


def test_overlapping_memory_slot(vm):
    with pytest.raises(MemorySlotOverlap, match="overlaps"):
        vm.memory.add_slot(0x100000, 0x1000)
    slot = vm.memory.add_slot(0x40000000, 0x2000)
    assert slot.slot == 1
    with pytest.raises(MemorySlotOverlap):
        vm.memory.add_slot(0x40001000, 0x1000)


def test_access_outside_memory(vm):
    with pytest.raises(GuestMemoryError, match="not inside one memory slot"):
        vm.memory.read((16 << 20) - 4, 8)
    with pytest.raises(GuestMemoryError):
        vm.memory.write(0x80000000, b"x")


def test_duplicate_vcpu_id_is_refused_before_kvm_sees_it(vm):
    vm.create_vcpu(0)
    with pytest.raises(InvalidArgument, match="vcpu_id=0: this VM already has a vCPU with that id"):
        vm.create_vcpu(0)
    assert vm.create_vcpu().id == 1                     # the next free id


def test_kvm_errors_are_typed_and_name_the_ioctl(vm):
    fd = vm._ioctl_value(Ioctl.CREATE_VCPU, 0)          # behind pykvm's checks: KVM's own EEXIST
    try:
        with pytest.raises(KvmError) as info:
            vm._ioctl_value(Ioctl.CREATE_VCPU, 0)
    finally:
        os.close(fd)
    assert info.value.errno == errno.EEXIST
    assert info.value.ioctl == "KVM_CREATE_VCPU" and "Vm" in info.value.target


def test_missing_device_is_explained(tmp_path, monkeypatch):
    # a wrong path where /dev/kvm exists names /dev/kvm (skipped where it does not: the next case is that)
    if os.path.exists(system.DEFAULT_PATH):
        with pytest.raises(KvmUnavailableError, match="this machine's KVM device is '/dev/kvm': pass that"):
            pykvm.Kvm("/dev/no-such-kvm")
    # no KVM device at all: load the module
    monkeypatch.setattr(system, "DEFAULT_PATH", str(tmp_path / "kvm"))
    with pytest.raises(KvmUnavailableError, match="modprobe") as info:
        pykvm.Kvm(str(tmp_path / "kvm"))
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOENT


def test_permission_denied_mentions_the_kvm_group(monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(KvmUnavailableError, match="kvm"):
        pykvm.Kvm()


def test_capability_the_host_lacks_is_a_typed_error(kvm):
    absent = [cap for cap in Cap if kvm.check_extension(cap) == 0]
    assert absent, "this host claims every capability pykvm knows; pick another to test"
    with pytest.raises(CapabilityMissing, match=f"KVM_CAP_{absent[0].name}"):
        kvm.require(absent[0], "this test")


@pytest.mark.host_independent        # this process's fds and memory: pykvm's own bookkeeping
def test_no_fd_or_memory_leak_over_200_cycles(kvm_available):
    process = psutil.Process()

    def cycle():
        with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
            vcpu = vm.create_vcpu()
            vcpu.regs
            vm.memory.write(0x1000, b"\x90" * 64)

    for _ in range(10):       # warm caches, allocator pools
        cycle()
    gc.collect()
    fds, rss = process.num_fds(), process.memory_info().rss
    for _ in range(200):
        cycle()
    gc.collect()
    assert process.num_fds() == fds
    assert process.memory_info().rss - rss < 8 << 20


@pytest.mark.parametrize("value", [0x80000001, 0xFFFFFFFF, 0x7FFFFFFF, 0])
def test_io_exit_data_keeps_every_bit(vcpu, value):
    # One-element IO exits come back packed from C: the top bit of a 32-bit OUT must survive.
    x86.load_code(vcpu, f"mov ${value:#x}, %eax\n out %eax, $0x10\n mov $0xab, %al\n out %al, $0x11\n hlt\n")
    wide, narrow = vcpu.run(), vcpu.run()
    assert (wide.port, wide.size, wide.value, wide.is_out) == (0x10, 4, value, True)
    assert (narrow.port, narrow.size, narrow.value) == (0x11, 1, 0xAB)


def test_ctrl_c_inside_vcpu_construction_closes_its_fd_without_a_traceback(vm, monkeypatch):
    # A Ctrl-C can land on any line of Vcpu.__init__: here right after KVM_CREATE_VCPU gave the
    # fd, before kvm_run is mapped. The half-built vCPU is closed when collected, silently.
    import pykvm.core.vcpu as vcpu_module
    real_ffi = vcpu_module.ffi

    class InterruptedFfi:
        def __getattr__(self, name):
            return getattr(real_ffi, name)

        def new(self, ctype, *args):
            if ctype == "struct pykvm_vcpu_guard *":
                raise KeyboardInterrupt
            return real_ffi.new(ctype, *args)

    unraisable = []                 # what __del__ raised: Python would print it as a traceback
    fds = psutil.Process().num_fds()
    monkeypatch.setattr(vcpu_module, "ffi", InterruptedFfi())
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    with pytest.raises(KeyboardInterrupt):
        vm.create_vcpu(0)
    gc.collect()
    monkeypatch.undo()
    assert psutil.Process().num_fds() == fds
    assert not unraisable, [(u.exc_type, u.exc_value) for u in unraisable]
    assert vm.create_vcpu(1).regs.rip is not None          # the VM goes on
