"""SMM requests (SMI, VM_DEAD) and the core API they need: memory slots of address space 1, EIO as KvmVmDead.

Each scenario's evidence is checked in detail against its control; on a host
without SMM both report the missing capability instead.
"""

from __future__ import annotations

import errno

import pytest

from pykvm import Cap
from pykvm.core.errors import CapabilityMissing, InvalidArgument, KvmVmDead, MemorySlotOverlap, ioctl_error
from pykvm.requests.scenarios import smm
from pykvm.testing import scenario_and_control


def test_eio_is_a_dead_vm_and_says_so():
    error = ioctl_error(errno.EIO, "KVM_RUN", "Vcpu 0 of Vm (fd 5)")
    assert isinstance(error, KvmVmDead) and error.errno == errno.EIO
    assert "the VM is dead (KVM_REQ_VM_DEAD)" in str(error) and "close it" in str(error)


def test_second_address_space_slots(kvm, vm):
    if kvm.check_extension(Cap.MULTI_ADDRESS_SPACE) < 2:
        with pytest.raises(CapabilityMissing, match="address_space=1.*KVM_CAP_MULTI_ADDRESS_SPACE"):
            vm.memory.add_slot(smm.SMBASE, smm.SMRAM_SIZE, address_space=1)
        return
    slot = vm.memory.add_slot(smm.SMBASE, smm.SMRAM_SIZE, address_space=1)  # overlaps RAM, in another space
    assert (slot.slot, slot.address_space) == (1 << 16, 1) and "address space 1" in repr(slot)
    vm.memory.write(smm.SMBASE, b"smram", address_space=1)
    assert vm.memory.read(smm.SMBASE, 5, address_space=1) == b"smram"
    assert vm.memory.read(smm.SMBASE, 5) == bytes(5)                       # address space 0 is other memory
    with pytest.raises(MemorySlotOverlap):
        vm.memory.add_slot(smm.SMBASE, 0x1000, address_space=1)
    vm.memory.remove_slot(slot.slot)
    assert [s.address_space for s in vm.memory.slots] == [0]
    with pytest.raises(InvalidArgument, match="address_space"):
        vm.memory.add_slot(smm.SMBASE, 0x1000, address_space=-1)


def test_smi_runs_the_smm_handler_and_rsm_returns(kvm):
    if (runs := scenario_and_control(kvm, smm.smi, Cap.X86_SMM, missing="KVM_CAP_X86_SMM")) is None:
        return                                  # no SMM here (kvm_pvm): said, checked in _runs
    outcome, control = runs
    evidence = outcome.evidence
    assert evidence["pending_after_ioctl"] == 1                     # KVM_SMI only made it pending
    assert evidence["handler_ran"] and evidence["smm_at_handler"] == 1
    assert evidence["marker"] == smm.SMM_MARKER and evidence["smm_after"] == 0
    assert evidence["saved_rip"] in (evidence["loop_rip"], evidence["loop_rip"] + 2)   # the out or the jmp
    if evidence["transitions"] is not None:
        assert evidence["transitions"] == [True, False]              # entering, then leaving at RSM
    assert outcome.verdict == "observed"
    c = control.evidence
    assert c["pending_after_ioctl"] == 0 and not c["handler_ran"] and c["smm_at_handler"] is None
    assert c["marker"] == 0 and c["saved_rip"] == 0 and c["transitions"] in (None, [])
    assert control.verdict == "absent"


def test_smi_without_smram_kills_the_vm_and_close_leaks_nothing(kvm):
    if (runs := scenario_and_control(kvm, smm.vm_dead, Cap.X86_SMM, missing="KVM_CAP_X86_SMM")) is None:
        return
    outcome, control = runs
    assert outcome.evidence["errors"] == {"KVM_RUN": "KvmVmDead", "KVM_GET_REGS": "KvmVmDead",
                                          "KVM_GET_CLOCK (VM)": "KvmVmDead"}
    assert outcome.evidence["fds_leaked"] == 0 and outcome.verdict == "observed"
    assert control.evidence["errors"] == {} and control.evidence["fds_leaked"] == 0
    assert control.verdict == "absent"
