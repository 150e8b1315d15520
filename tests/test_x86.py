"""x86 mode helpers with custom guests: handlers installed from Python, checked by what the guest reports."""

from __future__ import annotations

import struct

import pytest

import pykvm
from pykvm import x86
from pykvm.x86 import descriptors

REPORT_PORT = 0x10

# Each guest faults at `fault` and its handler reports the vector's interrupted IP with `out`.
GUESTS = {
    "real": (0, """
        start:  xor %ax, %ax
                xor %dx, %dx
                xor %cx, %cx
        fault:  div %cx                 # #DE: divide by zero
        de_handler:
                mov %sp, %bx
                mov %ss:(%bx), %ax      # the interrupted IP, pushed by the CPU
                out %ax, $0x10
                hlt
    """),
    "protected": (6, """
        start:  nop
        fault:  ud2                     # #UD
        ud_handler:
                mov (%esp), %eax        # the interrupted EIP
                out %eax, $0x10
                hlt
    """),
    "long": (6, """
        start:  nop
        fault:  ud2                     # #UD
        ud_handler:
                mov (%rsp), %rax        # the interrupted RIP
                out %eax, $0x10
                hlt
    """),
}


@pytest.mark.parametrize("mode", list(GUESTS))
def test_handlers_installed_from_python_take_the_guests_fault(vcpu, mode):
    vector, source = GUESTS[mode]
    handler = "de_handler" if vector == 0 else "ud_handler"
    code = x86.load_code(vcpu, source, mode, entry="start", handlers={vector: handler})
    exit = vcpu.run()
    assert isinstance(exit, pykvm.IoExit) and exit.port == REPORT_PORT, exit
    assert exit.value == code.address("fault")        # a fault: the IP of the faulting instruction


def test_without_a_handler_the_fault_shuts_the_guest_down(vcpu):
    # The control case: the same #UD with no gate for vector 6 is #NP, then #DF, then a triple fault.
    x86.load_code(vcpu, GUESTS["long"][1], "long", entry="start")
    exit = vcpu.run()
    assert isinstance(exit, pykvm.ShutdownExit), exit


def test_default_handler_takes_every_vector_without_its_own(vcpu):
    source = """
        start:  ud2
        other:  mov $0x99, %eax
                out %eax, $0x10
                hlt
    """
    code = pykvm.assemble(source, "long", x86.FREE_MEMORY)
    vcpu.vm.memory.write(x86.FREE_MEMORY, code.code)
    x86.enter_long_mode(vcpu, code.address("start"), default_handler=code.address("other"))
    exit = vcpu.run()
    assert isinstance(exit, pykvm.IoExit) and exit.value == 0x99


def test_gates_encode_the_handler_and_selector():
    gate = descriptors.idt_gate(0x1122334455667788, 0x18, long_mode=True)
    low, selector, ist, kind, middle, high, _ = struct.unpack("<HHBBHII", gate)
    assert (low, selector, ist, kind, middle, high) == (0x7788, 0x18, 0, 0x8E, 0x5566, 0x11223344)
    gate32 = descriptors.idt_gate(0x12345678, 0x08, long_mode=False)
    assert struct.unpack("<HHBBH", gate32) == (0x5678, 0x08, 0, 0x8E, 0x1234)
    table = descriptors.interrupt_table({13: 0x1000}, 0x18, long_mode=True)
    assert len(table) == 256 * 16 and table[:16] == bytes(16) and table[13 * 16] == 0x00


@pytest.mark.parametrize("handlers, match", [
    ({256: 0x1000}, "vectors are integers 0..255"),
    ({13: "here"}, "a handler is a guest address"),
    ({True: 0x1000}, "vectors are integers 0..255"),
])
def test_bad_handlers_are_refused_with_the_argument_named(vcpu, handlers, match):
    with pytest.raises(ValueError, match=match):
        x86.enter_long_mode(vcpu, 0x10000, handlers=handlers)
