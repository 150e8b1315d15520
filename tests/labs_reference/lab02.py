"""Lab 2 reference solution."""

import pykvm


def handler_source(task) -> str:
    return f"""
        push %bp
        mov %sp, %bp
        mov 2(%bp), %ax          # the interrupted IP: the CPU pushed FLAGS, CS, IP
        out %ax, ${task.report_port:#x}
        pop %bp
        iret
    """


def solve(task) -> None:
    code = pykvm.assemble(handler_source(task), "real", origin=0)
    task.vm.memory.write(task.handler_address, code.code)
    task.vm.memory.write_u16(4 * task.vector, 0)
    task.vm.memory.write_u16(4 * task.vector + 2, task.handler_address >> 4)
    injected = False
    while True:
        exit = task.vcpu.run()
        if isinstance(exit, pykvm.HltExit):
            return
        if not injected and task.vcpu.kvm_run.ready_for_interrupt_injection:
            task.vcpu.interrupt(task.vector)
            injected = True
