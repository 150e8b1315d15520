"""Lab 3, wrong: the #GP handler forgets to drop the error code before iretq."""


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
