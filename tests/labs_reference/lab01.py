"""Lab 1 reference solution."""

import pykvm
from pykvm import x86


def solve(task) -> None:
    with pykvm.Kvm() as kvm, kvm.create_vm(memory_size=0) as vm:
        vm.memory.add_slot(0, task.memory_size)
        vm.memory.write(task.address, task.code)
        vcpu = vm.create_vcpu()
        x86.enter_real_mode(vcpu, ip=0, cs=task.address >> 4)
        while True:
            exit = vcpu.run()
            if isinstance(exit, pykvm.IoExit) and exit.direction == pykvm.IoDirection.IN:
                exit.reply(task.answer)
            elif isinstance(exit, pykvm.HltExit):
                return
            elif not isinstance(exit, pykvm.IoExit):
                raise RuntimeError(f"unexpected exit {exit!r}")
