"""Lab 1, wrong: runs on without answering the IN (the guest reads whatever kvm_run held)."""

import pykvm
from pykvm import x86

# What the checker must say: [(the 1-based step that fails, a phrase its reason contains), ...]; any one.
EXPECTED_FAILURES = [(3, 'IN read 0')]


def solve(task) -> None:
    with pykvm.Kvm() as kvm, kvm.create_vm(memory_size=0) as vm:
        vm.memory.add_slot(0, task.memory_size)
        vm.memory.write(task.address, task.code)
        vcpu = vm.create_vcpu()
        x86.enter_real_mode(vcpu, ip=0, cs=task.address >> 4)
        while not isinstance(vcpu.run(), pykvm.HltExit):
            pass
