"""The x86 layer: CPU modes, descriptors, paging, vectors, MSRs and the assembler.

Why this exists: the core speaks KVM's API; this layer knows the architecture
on top of it, so that "a long-mode vCPU at RIP with a #GP handler" is one call:
``pykvm.x86.enter_long_mode(vcpu, rip, handlers={13: handler})``.
"""

from .asm import Assembled, Mode, assemble, assemble_file
from .descriptors import idt_gate, interrupt_table
from .modes import (
    cpu_mode,
    enter_long_mode,
    enter_mode,
    enter_protected_mode,
    enter_real_mode,
    linear_rip,
    load_code,
)
from .system_area import DEFAULT_STACK_TOP, FREE_MEMORY
from .vectors import ERROR_CODE_VECTORS, FIRST_EXTERNAL_VECTOR, Vector, vector_name

__all__ = ["Assembled", "Mode", "assemble", "assemble_file", "idt_gate", "interrupt_table", "cpu_mode",
           "enter_long_mode", "enter_mode", "enter_protected_mode", "enter_real_mode", "linear_rip", "load_code",
           "DEFAULT_STACK_TOP", "FREE_MEMORY", "ERROR_CODE_VECTORS", "FIRST_EXTERNAL_VECTOR", "Vector",
           "vector_name"]
