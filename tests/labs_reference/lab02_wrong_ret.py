"""Lab 2, wrong: the handler returns with ret, not iret."""


# What the checker must say: [(the 1-based step that fails, a phrase its reason contains), ...]; any one.
# After `ret` the guest runs on with CS and FLAGS left on its stack: on kvm_pvm it takes #GP and
# halts; on kvm_amd it ends with SP wrong, or runs away without exiting (the step's deadline).
EXPECTED_FAILURES = [(4, 'the main program'), (1, 'did not finish within')]


def handler_source(task) -> str:
    return f"""
        push %bp
        mov %sp, %bp
        mov 2(%bp), %ax          # the interrupted IP: the CPU pushed FLAGS, CS, IP
        out %ax, ${task.report_port:#x}
        pop %bp
        ret                      # wrong: leaves CS and FLAGS on the stack
    """
