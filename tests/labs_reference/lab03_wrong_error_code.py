"""Lab 3, wrong: the #GP handler forgets to drop the error code before iretq."""

import pykvm
from pykvm import x86

# What the checker must say: [(the 1-based step that fails, a phrase its reason contains), ...]; any one.
EXPECTED_FAILURES = [(5, 'a handler did not resume')]


def handlers_source(task) -> str:
    return f"""
de_handler:
        mov $0, %al
        xor %ebx, %ebx
        mov (%rsp), %rcx
        xor %edx, %edx
        out %al, ${task.report_port:#x}
        mov %rsi, (%rsp)
        iretq
gp_handler:
        mov $13, %al
        mov (%rsp), %rbx
        mov 8(%rsp), %rcx
        xor %edx, %edx
        out %al, ${task.report_port:#x}
        mov %rsi, (%rsp)
        iretq
pf_handler:
        mov $14, %al
        mov (%rsp), %rbx
        mov 8(%rsp), %rcx
        mov %cr2, %rdx
        out %al, ${task.report_port:#x}
        add $8, %rsp
        mov %rsi, (%rsp)
        iretq
"""


def solve(task) -> None:
    code = pykvm.assemble(handlers_source(task), "long", origin=task.handler_address)
    task.vm.memory.write(task.handler_address, code.code)
    x86.enter_long_mode(task.vcpu, task.entry, handlers={
        0: code.symbols["de_handler"], 13: code.symbols["gp_handler"], 14: code.symbols["pf_handler"]})
    for _ in range(100):
        if isinstance(task.vcpu.run(), pykvm.HltExit):
            return
