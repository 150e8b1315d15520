"""pykvm.x86.asm: GNU-assembler text to flat code and label addresses (no KVM needed)."""

import pytest

from pykvm import AssemblerError, assemble
from pykvm.guests import protocol


def test_labels_are_linear_addresses_at_origin():
    code = assemble("start: sti\nafter_sti: nop\n out %al, $0xe0\n", "long", 0x10000)
    assert code.code == bytes.fromhex("fb 90 e6 e0")
    assert code.address("start") == 0x10000
    assert code.address("after_sti") == 0x10001


def test_real_mode_uses_16_bit_encodings():
    code = assemble("mov $1, %ax\n mov $1, %eax\n", "real", 0)
    assert code.code == bytes.fromhex("b8 01 00 66 b8 01 00 00 00")


def test_data_follows_code_contiguously():
    code = assemble("nop\n.data\nvalue: .long 0x11223344\n", "protected", 0x10000)
    assert code.code[-4:] == bytes.fromhex("44 33 22 11")
    assert code.address("value") == 0x10000 + len(code) - 4


def test_defines_are_available_as_symbols_but_not_labels():
    code = assemble("out %al, $PORT_SYNC\n", "long", 0, defines={"PORT_SYNC": protocol.PORT_SYNC})
    assert code.code == bytes([0xE6, protocol.PORT_SYNC])
    assert "PORT_SYNC" not in code.symbols


def test_errors_name_the_line_of_the_source():
    with pytest.raises(AssemblerError) as info:
        assemble("nop\nnot_an_instruction %eax\n", "long")
    assert "<source>:2" in str(info.value)
    assert "not_an_instruction" in str(info.value)


def test_unknown_label_lists_the_known_ones():
    code = assemble("here: nop\n", "long")
    with pytest.raises(KeyError, match="here"):
        code.address("there")


def test_missing_binutils_is_explained(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(AssemblerError, match="binutils"):
        assemble("nop\n", "long")


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError):
        assemble("nop\n", "vm86")
