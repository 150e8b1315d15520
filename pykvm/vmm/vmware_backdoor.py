"""VMware's backdoor I/O port 0x5658: ``in`` with EAX = 'VMXh' and a command in CX answers in the registers.

Why this exists: QEMU's PC has it (``-machine vmport``, on by default), and
kvm-unit-tests' ``vmware_backdoors`` test calls its "get version" command.
The protocol, as VMware documents it for its guest tools: the guest loads
EAX = 0x564d5868 ('VMXh'), CX = a command, DX = 0x5658, and executes a
32-bit ``in``; the host answers in EAX, EBX, ECX and EDX. Implemented:
command 10, "get version", which returns EAX = the backdoor's version (6),
EBX = the magic, ECX = the product type (2). Any other command, a wrong
magic, or a narrower ``in`` reads all ones in EAX (what VMware's tools take
as "unsupported") and leaves the other registers alone; an ``out`` is
ignored.

What the port cannot do by itself: with KVM's ``enable_vmware_backdoor``
module parameter off (the default), an ``in`` from user mode that the TSS
I/O bitmap forbids raises #GP in the guest and never reaches this device,
and the backdoor's pseudo-PMCs (``rdpmc`` of 0x10000-0x10002) fault too:
only KVM, with that parameter on, lets them through.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..core.vcpu import Vcpu

PORT = 0x5658
PORTS = 1
MAGIC = 0x564D5868
VERSION = 6
PRODUCT_TYPE = 2
ALL_ONES = 0xFFFFFFFF


class BackdoorCommand(enum.IntEnum):
    """Commands, from CX."""

    GET_VERSION = 10


@dataclasses.dataclass(frozen=True)
class Answer:
    """What a command returns in EAX, EBX and ECX."""

    eax: int
    ebx: int
    ecx: int


def answer(eax: int, ecx: int) -> Answer | None:
    """The answer to an ``in`` made with these EAX and ECX, or None (unsupported: EAX reads all ones)."""
    if eax & ALL_ONES != MAGIC or ecx & 0xFFFF != BackdoorCommand.GET_VERSION:
        return None
    return Answer(VERSION, MAGIC, PRODUCT_TYPE)


class VmwareBackdoor:
    """The port; ``current_vcpu()`` returns the vCPU whose exit is being handled (its registers answer)."""

    def __init__(self, current_vcpu: Callable[[], Vcpu]) -> None:
        self._current_vcpu = current_vcpu

    def read(self, offset: int, size: int) -> int:
        if size != 4:
            return (1 << 8 * size) - 1
        vcpu = self._current_vcpu()
        regs = vcpu.regs
        reply = answer(regs.rax, regs.rcx)
        if reply is None:
            return ALL_ONES
        # EAX too, not only as the IO data: when KVM's instruction emulator completes the ``in``
        # after KVM_SET_REGS it reloads the registers and drops its own pending write of EAX.
        regs.rax, regs.rbx, regs.rcx = reply.eax, reply.ebx, reply.ecx
        vcpu.regs = regs
        return reply.eax

    def write(self, offset: int, size: int, value: int) -> None:
        pass
