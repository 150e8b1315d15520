"""Unit tests of the VMware backdoor port (pykvm.vmm.vmware_backdoor) without KVM: a vCPU's registers in, out."""

from __future__ import annotations

import copy

from pykvm.core.state import Regs
from pykvm.vmm import vmware_backdoor
from pykvm.vmm.vmware_backdoor import MAGIC, Answer, VmwareBackdoor, answer

UNTOUCHED = 0xDEADBEEF


class FakeVcpu:
    """Registers as KVM_GET_REGS / KVM_SET_REGS give and take them: a copy out, a count of sets in."""

    def __init__(self, regs: Regs) -> None:
        self._regs = regs
        self.sets = 0

    @property
    def regs(self) -> Regs:
        return copy.copy(self._regs)

    @regs.setter
    def regs(self, value: Regs) -> None:
        self._regs = value
        self.sets += 1


def port_in(rax: int, rcx: int, size: int = 4) -> tuple[int, FakeVcpu]:
    vcpu = FakeVcpu(Regs(rax=rax, rbx=UNTOUCHED, rcx=rcx, rdx=vmware_backdoor.PORT))
    return VmwareBackdoor(lambda: vcpu).read(0, size), vcpu


def test_get_version_answers_version_magic_and_product_type():
    assert answer(MAGIC, 10) == Answer(6, MAGIC, 2)
    assert answer(MAGIC | 0xFFFFFFFF00000000, 0xABCD000A) == Answer(6, MAGIC, 2)   # EAX, CX only
    eax, vcpu = port_in(MAGIC, 10)
    assert (eax, vcpu.regs.rax, vcpu.regs.rbx, vcpu.regs.rcx, vcpu.sets) == (6, 6, MAGIC, 2, 1)


def test_other_commands_a_wrong_magic_or_a_narrow_in_leave_the_registers():
    for rax, rcx, size in ((MAGIC, 0xFFF, 4), (MAGIC + 1, 10, 4), (MAGIC, 10, 2)):
        value, vcpu = port_in(rax, rcx, size)
        assert value == (1 << 8 * size) - 1
        assert (vcpu.regs.rbx, vcpu.regs.rcx, vcpu.sets) == (UNTOUCHED, rcx, 0)


def test_an_out_is_ignored():
    vcpu = FakeVcpu(Regs(rax=MAGIC, rcx=10))
    VmwareBackdoor(lambda: vcpu).write(0, 4, MAGIC)
    assert vcpu.sets == 0
