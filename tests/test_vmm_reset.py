"""The reset ports (pykvm.vmm.reset): which writes reset, with a control write beside each that must not."""

from __future__ import annotations

import pytest

from pykvm.vmm.reset import KbcStatus, KeyboardController, ResetControl, SystemControlA


@pytest.fixture
def resets() -> list[str]:
    return []


def test_port_92_resets_when_bit_0_rises(resets):
    port = SystemControlA(resets.append)
    assert port.read(0, 1) == 0x02                           # A20 on, as after power-on
    port.write(0, 1, port.read(0, 1) & ~1)                   # init.c clears bit 0 first: no reset
    assert resets == []
    port.write(0, 1, port.read(0, 1) | 1)
    assert resets == ["port 0x92 bit 0 (fast reset)"]
    assert port.read(0, 1) == 0x03                           # bit 0 reads back
    port.write(0, 1, 0x03)                                   # already set: no edge, no second reset
    assert len(resets) == 1


@pytest.mark.parametrize(("writes", "reason"), [
    ((0, 4), "port 0xcf9 (soft reset, 0x04 written)"),
    ((0, 6), "port 0xcf9 (hard reset, 0x06 written)"),
    ((0x08, 0x0E), "port 0xcf9 (hard reset, 0x0e written)"),
])
def test_0xcf9_resets_when_rst_cpu_rises(resets, writes, reason):
    port = ResetControl(resets.append)
    for value in writes:
        port.write(0, 1, value)
    assert resets == [reason]


def test_0xcf9_without_rst_cpu_only_keeps_sys_rst_and_full_rst(resets):
    port = ResetControl(resets.append)
    port.write(0, 1, 0xFA)
    assert resets == [] and port.read(0, 1) == 0x0A


@pytest.mark.parametrize("command", [0xFE, 0xF0, 0xFC])
def test_a_pulse_of_8042_line_0_resets(resets, command):
    kbc = KeyboardController(resets.append)
    kbc.write(0, 1, command)
    assert resets == [f"port 0x64 command {command:#04x} (keyboard controller reset)"]


@pytest.mark.parametrize("command", [0xFF, 0xF1, 0xD1, 0xAD, 0x20])
def test_other_8042_commands_do_not_reset(resets, command):
    kbc = KeyboardController(resets.append)
    kbc.write(0, 1, command)
    assert resets == []
    assert kbc.read(0, 1) == KbcStatus.SYSTEM_FLAG           # both buffers empty: init.c's loops end
