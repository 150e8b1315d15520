"""String IO (``rep ins``/``rep outs``): KVM_EXIT_IO with ``count`` > 1, decoded and dispatched element by element.

Unit tests (no KVM) decode a fake ``kvm_run`` and drive the Machine's IO
dispatch with hand-made exits; hardware tests run small guests that move
buffers through a port with ``rep outs``/``rep ins`` of each size, directly on
a vCPU and through :class:`pykvm.vmm.Machine` to a bus device, and check what
the device saw and what landed in guest memory. (kvm-unit-tests' ``emulator``
flat, with its ``rep outsb`` checks, is booted in ``tests/test_kut_boot.py``.)
"""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import pytest

import pykvm
from pykvm import x86
from pykvm.core import exits
from pykvm.core.constants import IoDirection
from pykvm.core.errors import InvalidArgument
from pykvm.vmm import Ending, Machine, testkernels

SIZES = [1, 2, 4]
SUFFIX = {1: "b", 2: "w", 4: "l"}
ELEMENTS = 700              # 2800 bytes at size 4: KVM splits the IN into several exits
PORT = 0x10
RECORDER_PORT = 0x700       # a free port for the Machine tests' recording device
TIMEOUT = 60.0


class FakeVcpu:
    """What IoExit and the Machine's dispatch read from a vCPU, with the replies it was given."""

    def __init__(self, buffer: bytes = b"") -> None:
        self._run_buffer = buffer
        self._exit_sequence = 1
        self.replies: list[bytes] = []
        self.id = 0
        self.regs = SimpleNamespace(rip=0x100123)

    def _write_exit_reply(self, sequence: int, field: str, values: dict) -> None:
        assert (sequence, field) == (self._exit_sequence, "io")
        self.replies.append(values["data"])


def fake_run(port: int, direction: int, size: int, count: int, data_offset: int) -> SimpleNamespace:
    return SimpleNamespace(io=SimpleNamespace(port=port, direction=direction, size=size, count=count,
                                              data_offset=data_offset))


# ---- decoding -------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("direction", [IoDirection.IN, IoDirection.OUT])
def test_an_io_exit_with_count_over_one_decodes_count_times_size_bytes(size, direction):
    payload = bytes(range(1, 3 * size + 1))
    vcpu = FakeVcpu(bytes(4096) + payload + b"\xee" * 16)   # the bytes after it are not the exit's
    exit = exits.DECODERS[exits.ExitReason.IO](vcpu, fake_run(0x511, int(direction), size, 3, 4096))
    assert type(exit) is pykvm.IoExit
    assert (exit.port, exit.direction, exit.size, exit.count, exit.data) == (0x511, direction, size, 3, payload)
    assert exit.is_out == (direction == IoDirection.OUT)
    assert exit.value == int.from_bytes(payload[:size], "little")


@pytest.mark.host_independent
def test_a_packed_one_element_exit_decodes_as_the_c_helper_packs_it():
    # pykvm_run_guarded's layout: bits 0-7 KVM_EXIT_IO, 8 direction, 9-11 size, 12 the packed mark, 13-28 port,
    # 29-60 the element
    packed = 2 | 1 << 8 | 2 << 9 | 1 << 12 | 0x3F8 << 13 | 0xBEEF << 29
    exit = pykvm.IoExit.from_packed("vcpu", 7, packed)
    assert (exit.port, exit.direction, exit.size, exit.count, exit.data, exit.vcpu, exit.sequence) == (
        0x3F8, IoDirection.OUT, 2, 1, b"\xef\xbe", "vcpu", 7)


def test_the_packed_exit_is_the_exit_in_kvm_run(vcpu):
    x86.load_code(vcpu, "mov $0xbeef, %ax\nmov $0x3f8, %dx\nout %ax, %dx\nin $0x61, %al\nhlt\n")
    seen = []
    for _ in range(2):
        packed = vcpu.run()                                   # one element of <= 4 bytes: C packed it
        assert pykvm.IoExit.from_run(vcpu, vcpu._run_c) == packed
        seen.append((packed.port, packed.direction, packed.size, packed.data if packed.is_out else b""))
    assert seen == [(0x3F8, IoDirection.OUT, 2, b"\xef\xbe"), (0x61, IoDirection.IN, 1, b"")]


@pytest.mark.parametrize("size", SIZES)
def test_reply_to_a_string_in_takes_count_elements(size):
    vcpu = FakeVcpu()
    exit = pykvm.IoExit(vcpu, 1, 0xE0, IoDirection.IN, size, 3)
    exit.reply(bytes(range(3 * size)))
    exit.reply(0x7F)                                  # an integer answers every element
    assert vcpu.replies == [bytes(range(3 * size)), (0x7F).to_bytes(size, "little") * 3]
    with pytest.raises(InvalidArgument, match=f"3 x {size} bytes needs {3 * size} bytes, got {size}"):
        exit.reply(bytes(size))


# ---- the Machine's dispatch, without KVM -------------------------------------------------------


class Recorder:
    """A bus device that logs every access and answers reads with 0x11, 0x12, ... (one per read)."""

    def __init__(self) -> None:
        self.accesses: list[tuple[str, int, int, int]] = []
        self.next = 0x11

    def read(self, offset: int, size: int) -> int:
        value = int.from_bytes(bytes(range(self.next, self.next + size)), "little")
        self.next += size
        self.accesses.append(("read", offset, size, value))
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        self.accesses.append(("write", offset, size, value))

    def written(self, offset: int) -> bytes:
        """What was written at ``offset``, the elements' bytes in order."""
        return b"".join(value.to_bytes(size, "little") for kind, at, size, value in self.accesses
                        if kind == "write" and at == offset)


def machine_with_recorder(kernel: Path | bytes | None = None, **options) -> tuple[Machine, Recorder]:
    machine = Machine(testkernels.path("hello") if kernel is None else kernel, **options)
    recorder = Recorder()
    machine.add_io(RECORDER_PORT, 2, recorder, "recorder")
    return machine, recorder


@pytest.mark.parametrize("size", SIZES)
def test_the_machine_gives_each_element_of_a_string_out_to_the_device_in_order(size):
    machine, recorder = machine_with_recorder()
    data = bytes(range(0x40, 0x40 + 3 * size))
    machine._port_io(FakeVcpu(), pykvm.IoExit(FakeVcpu(), 1, RECORDER_PORT + 1, IoDirection.OUT, size, 3, data))
    assert recorder.accesses == [("write", 1, size, int.from_bytes(data[i:i + size], "little"))
                                 for i in range(0, 3 * size, size)]


@pytest.mark.parametrize("size", SIZES)
def test_the_machine_answers_a_string_in_with_one_device_read_per_element(size):
    machine, recorder = machine_with_recorder()
    vcpu = FakeVcpu()
    machine._port_io(vcpu, pykvm.IoExit(vcpu, 1, RECORDER_PORT, IoDirection.IN, size, 3))
    assert [(kind, offset, width) for kind, offset, width, _ in recorder.accesses] == [("read", 0, size)] * 3
    assert vcpu.replies == [bytes(range(0x11, 0x11 + 3 * size))]


def test_the_trace_shows_a_string_outs_elements_and_count():
    trace = io.StringIO()
    machine, _ = machine_with_recorder(trace=trace)
    machine._port_io(FakeVcpu(), pykvm.IoExit(FakeVcpu(), 1, RECORDER_PORT, IoDirection.OUT, 2, 3, b"ABCDEF"))
    machine._port_io(FakeVcpu(), pykvm.IoExit(FakeVcpu(), 1, RECORDER_PORT, IoDirection.OUT, 2, 1, b"AB"))
    assert trace.getvalue().splitlines() == [f"vcpu 0: out port {RECORDER_PORT:#x} size 2 count 3 data 414243444546",
                                             f"vcpu 0: out port {RECORDER_PORT:#x} size 2 value 0x4241"]


def test_a_string_in_from_an_unclaimed_port_reads_ones_and_counts_every_element():
    machine, _ = machine_with_recorder()
    vcpu = FakeVcpu()
    machine._port_io(vcpu, pykvm.IoExit(vcpu, 1, 0x1234, IoDirection.IN, 2, 5))
    assert vcpu.replies == [b"\xff" * 10]
    (unknown,) = machine._unknown.values()
    assert (unknown.address, unknown.count, unknown.first_size, unknown.first_rip) == (0x1234, 5, 2, 0x100123)


# ---- hardware: a guest on a bare vCPU ----------------------------------------------------------------


def string_io_guest(size: int, down: bool) -> str:
    """``rep outs`` ELEMENTS elements of ``src`` to PORT, then ``rep ins`` as many into ``dst``; hlt."""
    span = (ELEMENTS - 1) * size
    direction = "std" if down else "cld"
    return f"""
        start:  {direction}
                mov $src{f' + {span}' if down else ''}, %esi
                mov ${ELEMENTS}, %ecx
                mov ${PORT}, %dx
                rep outs{SUFFIX[size]}
                mov $dst{f' + {span}' if down else ''}, %edi
                mov ${ELEMENTS}, %ecx
                rep ins{SUFFIX[size]}
                cld
                hlt
        src:    .rept {ELEMENTS * size}
                .byte (. - src) * 7 & 0xff
                .endr
        dst:    .fill {ELEMENTS * size}, 1, 0
    """


@pytest.mark.parametrize("down", [False, True], ids=["up", "down"])
@pytest.mark.parametrize("size", SIZES)
def test_rep_outs_and_rep_ins_on_a_vcpu(vcpu, size, down):
    code = x86.load_code(vcpu, string_io_guest(size, down), "protected", entry="start")
    nbytes = ELEMENTS * size
    source = vcpu.vm.memory.read(code.address("src"), nbytes)
    answers = bytes((index * 13 + 5) & 0xFF for index in range(nbytes))     # the IN elements, in order
    written, given, in_counts = bytearray(), 0, []
    while True:
        exit = vcpu.run()
        if isinstance(exit, pykvm.HltExit):
            break
        assert isinstance(exit, pykvm.IoExit) and (exit.port, exit.size) == (PORT, size), exit
        assert len(exit.data) == exit.count * size
        if exit.is_out:
            written += exit.data
        else:
            in_counts.append(exit.count)
            exit.reply(answers[given:given + exit.count * size])
            given += exit.count * size
    elements = [source[i:i + size] for i in range(0, nbytes, size)]
    assert bytes(written) == b"".join(reversed(elements) if down else elements)
    assert given == nbytes and max(in_counts) > 1, in_counts    # KVM batched the IN: string IO exits
    landed = vcpu.vm.memory.read(code.address("dst"), nbytes)
    got = [answers[i:i + size] for i in range(0, nbytes, size)]
    assert landed == b"".join(reversed(got) if down else got)    # element k of the reads went to k-th slot


# ---- hardware: through the Machine to bus devices --------------------------------------------------


def multiboot_image(body: str) -> bytes:
    """A Multiboot kernel at 1 MiB (header address fields, no ELF) running ``body`` in 32-bit code."""
    source = f"""
        header: .long 0x1BADB002, 0x00010000, -(0x1BADB002 + 0x00010000)
                .long header, header, 0, 0, start
        start:  {body}
                xor %eax, %eax
                out %eax, $0xf4
        """
    return pykvm.assemble(source, "protected", 0x100000).code


@pytest.mark.parametrize("size", SIZES)
def test_the_machine_runs_string_io_against_a_device(kvm, size):
    nbytes = 5 * size
    suffix = SUFFIX[size]
    image = multiboot_image(f"""
                cld
                mov $src, %esi
                mov $5, %ecx
                mov ${RECORDER_PORT}, %dx
                rep outs{suffix}                    # 5 elements to the recorder at offset 0
                mov $dst, %edi
                mov $5, %ecx
                rep ins{suffix}                     # 5 reads from it
                mov $dst, %esi
                mov ${nbytes}, %ecx
                inc %dx
                rep outsb                           # what landed, byte by byte, to offset 1
                mov $0x510, %dx
                xor %eax, %eax
                out %ax, %dx                        # fw_cfg: select the signature
                inc %dx
                mov $sig, %edi
                mov $4, %ecx
                rep insb                            # "QEMU"
                mov $sig, %esi
                mov $4, %ecx
                mov ${RECORDER_PORT + 1}, %dx
                rep outsb
                jmp done
        src:    .ascii "ABCDEFGHIJKLMNOPQRST"
        dst:    .fill 20, 1, 0
        sig:    .fill 4, 1, 0
        done:
    """)
    machine, recorder = machine_with_recorder(image, kvm=kvm)
    result = machine.run(timeout=TIMEOUT)
    assert (result.ending, result.status, result.unknown) == (Ending.EXIT_PORT, 1, []), result.message
    assert recorder.written(0) == b"ABCDEFGHIJKLMNOPQRST"[:nbytes]
    reads = [(kind, offset, width) for kind, offset, width, _ in recorder.accesses if kind == "read"]
    assert reads == [("read", 0, size)] * 5
    assert recorder.written(1) == bytes(range(0x11, 0x11 + nbytes)) + b"QEMU"
