"""GET_NESTED_STATE_PAGES: the nested-state API (layout against the header), the vmcb12 builder, the scenario.

The scenario's evidence is asserted where the host runs nested SVM (the vCPU
stat guest_mode, L2's port write, the #VMEXIT code L1 read from vmcb12, the
kvm_nested_vmexit_inject event); elsewhere that the host lacks it, read again.
"""

from __future__ import annotations

import struct
import subprocess

import pytest

from pykvm import Cap
from pykvm.core.binding import ffi
from pykvm.core.constants import NESTED_SVM_VMCB_SIZE, NestedFlag, NestedFormat
from pykvm.core.errors import ArgumentTypeError, CapabilityMissing
from pykvm.core.ioctls import Ioctl
from pykvm.core.state import NestedState, Segment, Sregs
from pykvm.requests import OBSERVED, UNREACHABLE
from pykvm.requests.scenarios import nested

HEADER_PROGRAM = r"""
#include <stdio.h>
#include <linux/kvm.h>
int main(void) {
    printf("%lu %lu %lu %d %d %d %d\n", (unsigned long)KVM_GET_NESTED_STATE, (unsigned long)KVM_SET_NESTED_STATE,
           (unsigned long)sizeof(struct kvm_nested_state), KVM_STATE_NESTED_FORMAT_SVM, KVM_STATE_NESTED_GUEST_MODE,
           KVM_STATE_NESTED_GIF_SET, KVM_STATE_NESTED_SVM_VMCB_SIZE);
    return 0;
}
"""


def test_nested_state_layout_matches_the_header(tmp_path):
    source = tmp_path / "nested.c"
    source.write_text(HEADER_PROGRAM)
    try:
        subprocess.run(["cc", "-o", str(tmp_path / "nested"), str(source)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"no C compiler with <linux/kvm.h>: {exc}")
    numbers = subprocess.run([str(tmp_path / "nested")], capture_output=True, text=True, check=True).stdout.split()
    assert [int(n) for n in numbers] == [
        int(Ioctl.GET_NESTED_STATE), int(Ioctl.SET_NESTED_STATE), ffi.sizeof("struct kvm_nested_state"),
        NestedFormat.SVM, NestedFlag.GUEST_MODE, NestedFlag.GIF_SET, NESTED_SVM_VMCB_SIZE]


def test_nested_state_converts_to_and_from_the_struct():
    state = NestedState.svm(0x30000, b"\x01\x02")
    cdata = state.to_c()
    raw = ffi.buffer(cdata, cdata.size)[:]
    assert len(raw) == 128 + 4096 and struct.unpack_from("<HHIQ", raw) == (0x101, 1, 4224, 0x30000)
    larger = ffi.from_buffer("struct kvm_nested_state *", bytearray(raw + bytes(64)))   # KVM's buffer may be larger
    again = NestedState.from_c(larger)
    assert again == state and again.guest_mode and again.vmcb_pa == 0x30000 and again.data[:2] == b"\x01\x02"
    outside = NestedState.svm(0, b"", guest_mode=False)
    assert not outside.guest_mode and outside.data == b"" and outside.to_c().size == 128


def test_vmcb12_holds_the_intercepts_and_the_l1_state():
    code = Segment(selector=0x8, type=0xB, s=1, present=1, l=1, g=1, limit=0xFFFFFFFF)
    data = Segment(selector=0x10, type=0x3, s=1, present=1, db=1, g=1, limit=0xFFFFFFFF)
    sregs = Sregs(cs=code, ds=data, es=data, ss=data, cr0=0x80000011, cr3=0x4000, cr4=0x20, efer=0x500)
    page = nested.vmcb12(sregs, l1_rip=0x10040, l1_rsp=0xE000)
    assert struct.unpack_from("<II", page, 0x0C) == (1 << 24 | 1 << 28, 1)  # HLT, MSR_PROT; VMRUN
    assert struct.unpack_from("<QQQI", page, 0x40) == (nested.IOPM, nested.MSRPM, 0, 1)   # TSC offset, ASID
    assert nested.VMCB_SEGMENT.unpack_from(page, 0x410) == (0x8, 0xA9B, 0xFFFFFFFF, 0)   # 64-bit code
    assert nested.VMCB_SEGMENT.unpack_from(page, 0x420) == (0x10, 0xC93, 0xFFFFFFFF, 0)
    assert struct.unpack_from("<Q", page, 0x4D0)[0] == 0x500 | nested.EFER_SVME
    assert struct.unpack_from("<QQQ", page, 0x548) == (0x20, 0x4000, 0x80000011)
    assert struct.unpack_from("<Q", page, 0x578)[0] == 0x10040 and struct.unpack_from("<Q", page, 0x5D8)[0] == 0xE000


def test_set_nested_state_refuses_what_is_not_a_state(kvm, vcpu):
    with pytest.raises(ArgumentTypeError, match="state="):
        vcpu.set_nested_state(b"raw bytes")
    if not kvm.check_extension(Cap.NESTED_STATE):
        with pytest.raises(CapabilityMissing, match="KVM_CAP_NESTED_STATE"):
            vcpu.get_nested_state()
        return
    state = vcpu.get_nested_state()                          # a fresh vCPU: not in guest mode
    assert not state.guest_mode


def test_restored_nested_state_runs_l2_and_its_exit_reaches_l1(kvm):
    outcome, control = nested.get_nested_state_pages(), nested.get_nested_state_pages(control=True)
    lacking = nested.nested_svm(kvm)
    if lacking:
        assert outcome.verdict == control.verdict == UNREACHABLE and lacking in outcome.why
        return
    assert outcome.verdict == OBSERVED and control.verdict == "absent", (outcome.steps, control.steps)
    e, quiet = outcome.evidence, control.evidence
    assert e["guest_mode"] == 1 and e["l2_ran"] and e["l1_exit_code"] == nested.VMEXIT_MSR
    if e["traced"]:
        assert nested.VMEXIT_MSR in e["nested_vmexit_inject"]
    assert quiet["guest_mode"] == 0 and quiet["l2_ran"] and quiet["l1_exit_code"] is None and quiet["halted"]
    assert quiet["nested_vmexit_inject"] == []
