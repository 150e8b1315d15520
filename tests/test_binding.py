"""The binding agrees with the system's <linux/kvm.h> (no KVM needed)."""

import pytest

from pykvm.core import constants, exits
from pykvm.core.binding import ffi, lib
from pykvm.core.ioctls import Ioctl


@pytest.mark.parametrize("ioctl", list(Ioctl), ids=lambda i: i.macro)
def test_ioctl_number_matches_header_macro(ioctl):
    assert int(ioctl) == getattr(lib, ioctl.macro), (
        f"{ioctl.macro}: pykvm computes {int(ioctl):#x}, the header says {getattr(lib, ioctl.macro):#x}")


@pytest.mark.parametrize("name,value", sorted(constants.header_macro_names().items()))
def test_enum_value_matches_header_macro(name, value):
    assert getattr(lib, name) == value


def test_kvm_run_fixed_abi_offsets():
    # Offsets every KVM userspace relies on (Documentation/virt/kvm/api.rst, struct kvm_run).
    expected = {"request_interrupt_window": 0, "immediate_exit": 1, "exit_reason": 8,
                "ready_for_interrupt_injection": 12, "if_flag": 13, "flags": 14, "cr8": 16,
                "apic_base": 24, "io": 32, "mmio": 32, "internal": 32, "system_event": 32}
    for field, offset in expected.items():
        assert ffi.offsetof("struct kvm_run", field) == offset, field
    assert ffi.offsetof("pykvm_exit_io", "port") == 2
    assert ffi.offsetof("pykvm_exit_io", "data_offset") == 8


def test_struct_sizes_are_the_headers():
    assert ffi.sizeof("struct kvm_regs") == 18 * 8
    assert ffi.sizeof("struct kvm_segment") == 24
    assert ffi.sizeof("struct kvm_sregs") == 8 * 24 + 2 * 16 + 7 * 8 + 4 * 8
    assert ffi.sizeof("struct kvm_vcpu_events") == 64
    assert ffi.sizeof("struct kvm_lapic_state") == 1024
    # the union of exit payloads is padded to 256 bytes, sync regs follow
    assert ffi.sizeof("struct kvm_run") >= 32 + 256 + 16 + 2048


def test_every_x86_exit_payload_is_declared():
    for field in ("io", "mmio", "hypercall", "debug", "fail_entry", "internal",
                  "emulation_failure", "system_event", "msr", "ex", "hw"):
        assert ffi.offsetof("struct kvm_run", field) == 32, field


def test_irqchip_and_stats_struct_sizes_are_the_headers():
    # Sizes fixed by the ABI (Documentation/virt/kvm/api.rst); the ioctl numbers encode them.
    sizes = {"struct kvm_irq_level": 8, "struct kvm_irqchip": 520, "struct kvm_pic_state": 16,
             "struct kvm_ioapic_state": 24 + 24 * 8, "struct kvm_irq_routing_entry": 48,
             "struct kvm_irq_routing": 8, "struct kvm_msi": 32, "struct kvm_irqfd": 32,
             "struct kvm_ioeventfd": 64, "struct kvm_pit_config": 64, "struct kvm_signal_mask": 4,
             "struct kvm_stats_header": 24, "struct kvm_stats_desc": 16}
    assert {name: ffi.sizeof(name) for name in sizes} == sizes
    assert ffi.offsetof("struct kvm_irq_routing_entry", "u") == 16
    assert ffi.offsetof("struct kvm_irqchip", "chip") == 8


def test_an_internal_error_names_its_suberror_and_keeps_one_it_does_not_know_as_a_number():
    run = ffi.new("struct kvm_run *")
    run.internal.suberror, run.internal.ndata = constants.InternalErrorKind.EMULATION, 2
    run.internal.data[0:2] = [0, 4096]
    exit = exits._internal(None, run)
    assert exit.suberror is constants.InternalErrorKind.EMULATION and exit.data == (0, 4096)
    assert repr(exit).startswith("InternalErrorExit(suberror=EMULATION, data=(0, 4096)")
    run.internal.suberror = 99                                  # a newer kernel's
    exit = exits._internal(None, run)
    assert exit.suberror == 99 and not isinstance(exit.suberror, constants.InternalErrorKind)
    assert "suberror=0x63" in repr(exit)
