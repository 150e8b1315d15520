"""Lab 2, wrong: hard-codes vector 0x40."""

import pykvm

# What the checker must say: [(the 1-based step that fails, a phrase its reason contains), ...]; any one.
EXPECTED_FAILURES = [(2, 'you injected vector 0x40')]


def solve(task) -> None:
    code = pykvm.assemble(handler_source(task), "real", origin=0)
    task.vm.memory.write(task.handler_address, code.code)
    task.vm.memory.write_u16(4 * 0x40, 0)
    task.vm.memory.write_u16(4 * 0x40 + 2, task.handler_address >> 4)
    injected = False
    while True:
        exit = task.vcpu.run()
        if isinstance(exit, pykvm.HltExit):
            return
        if not injected and task.vcpu.kvm_run.ready_for_interrupt_injection:
            task.vcpu.interrupt(0x40)
            injected = True
