"""Lab 1 solved as the sheet suggests, printing each exit (the checker shows the output)."""

import pykvm
from pykvm import x86


def solve(task) -> None:
    print("task:", task)
    with pykvm.Kvm() as kvm, kvm.create_vm(memory_size=0) as vm:
        vm.memory.add_slot(0, task.memory_size)
        vm.memory.write(task.address, task.code)
        vcpu = vm.create_vcpu()
        x86.enter_real_mode(vcpu, ip=0, cs=task.address // 16)
        while True:
            exit = vcpu.run()
            print(exit, hex(vcpu.regs.rip))
            if isinstance(exit, pykvm.HltExit):
                break
            if isinstance(exit, pykvm.IoExit) and exit.direction == pykvm.IoDirection.IN:
                exit.reply(task.answer)
