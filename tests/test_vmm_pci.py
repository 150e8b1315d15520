"""Unit tests of pykvm.vmm.pci and pykvm.vmm.pci_testdev without KVM: configuration ports, BARs, windows, tests.

The guest's view is driven through the claims the host puts on the machine's
buses (ports 0xcf8/0xcfc and the windows), as a vCPU's exits would.
"""

from __future__ import annotations

import pytest

from pykvm.core.errors import CapabilityMissing, InvalidArgument
from pykvm.vmm import Machine, pci, pci_testdev, testkernels
from pykvm.vmm.pci import Bar, BarKind, Identity, PciFunction, PciHost
from pykvm.vmm.pci_testdev import PciTestdev

ENABLE = 0x80000000
KERNEL = testkernels.path("hello")


class Guest:
    """A PCI host reached as a guest reaches it: port and MMIO accesses at absolute addresses."""

    def __init__(self, host: PciHost) -> None:
        self.host = host
        self.io = {}
        self.mmio = []
        for claim in host.claims():
            if claim.io:
                for port in range(claim.base, claim.base + claim.length):
                    self.io[port] = (claim.base, claim.device)
            else:
                self.mmio.append((claim.base, claim.length, claim.device))

    def outp(self, port: int, size: int, value: int) -> None:
        base, device = self.io[port]
        device.write(port - base, size, value)

    def inp(self, port: int, size: int) -> int:
        base, device = self.io[port]
        return device.read(port - base, size)

    def config_read(self, device: int, register: int, size: int = 4, function: int = 0) -> int:
        """As kvm-unit-tests' x86 accessors: the full register offset in CONFIG_ADDRESS, then 0xcfc."""
        self.outp(0xCF8, 4, ENABLE | device << 11 | function << 8 | register)
        return self.inp(0xCFC, size)

    def config_write(self, device: int, register: int, size: int, value: int) -> None:
        self.outp(0xCF8, 4, ENABLE | device << 11 | register)
        self.outp(0xCFC, size, value)

    def mmio_device(self, address: int):
        for base, length, device in self.mmio:
            if base <= address < base + length:
                return base, device
        raise AssertionError(f"no claim at {address:#x}")

    def read(self, address: int, size: int) -> int:
        base, device = self.mmio_device(address)
        return device.read(address - base, size)

    def write(self, address: int, size: int, value: int) -> None:
        base, device = self.mmio_device(address)
        device.write(address - base, size, value)


class Recorder(PciFunction):
    """A function with a memory and an IO BAR that logs what reaches it."""

    def __init__(self) -> None:
        super().__init__(Identity(0x1234, 0x5678, 0xFF0000, revision=3),
                         (Bar(BarKind.MEMORY, 0x1000), Bar(BarKind.IO, 0x20)), interrupt_pin=1)
        self.log: list[tuple] = []
        self.changes = 0

    def bar_read(self, index: int, offset: int, size: int) -> int:
        self.log.append(("read", index, offset, size))
        return 0xA5

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        self.log.append(("write", index, offset, size, value))

    def decoding_changed(self) -> None:
        self.changes += 1


@pytest.fixture
def guest() -> Guest:
    host = PciHost()
    host.add(3, Recorder())
    return Guest(host)


# ---- configuration mechanism #1 ---------------------------------------------------------

def test_the_host_bridge_answers_at_00_0():
    guest = Guest(PciHost())
    assert guest.config_read(0, 0x00) == 0x12378086
    assert guest.config_read(0, 0x08) == 0x06000000               # class: host bridge
    assert guest.config_read(0, 0x0E, 1) == 0                      # header type 0, one function


def test_the_low_bits_of_the_address_and_the_data_port_offset_add_up(guest):
    assert guest.config_read(3, 0x02, 2) == 0x5678                 # kvm-unit-tests: offset in the address
    guest.outp(0xCF8, 4, ENABLE | 3 << 11)
    assert (guest.inp(0xCFE, 2), guest.inp(0xCFD, 1), guest.inp(0xCFC, 4)) == (0x5678, 0x12, 0x56781234)
    assert guest.config_read(3, 0x3D, 1) == 1 and guest.config_read(3, 0x08, 1) == 3


def test_absent_devices_functions_buses_and_disabled_accesses_read_all_ones(guest):
    assert guest.config_read(5, 0x00) == 0xFFFFFFFF                # no device 5
    assert guest.config_read(3, 0x00, function=1) == 0xFFFFFFFF    # single-function
    guest.outp(0xCF8, 4, ENABLE | 1 << 16 | 3 << 11)
    assert guest.inp(0xCFC, 4) == 0xFFFFFFFF                       # bus 1
    guest.outp(0xCF8, 4, 3 << 11)
    assert guest.inp(0xCFC, 2) == 0xFFFF                           # enable bit clear
    guest.outp(0xCFC, 2, 0)                                        # dropped
    assert guest.config_read(3, 0x00) == 0x56781234


def test_config_address_takes_only_dword_accesses_and_drops_reserved_bits():
    guest = Guest(PciHost())
    guest.outp(0xCF8, 4, 0xFFFFFFFF)
    assert guest.inp(0xCF8, 4) == 0x80FFFFFF
    guest.outp(0xCF8, 1, 0)                                        # not a configuration access
    assert (guest.inp(0xCF8, 4), guest.inp(0xCF8, 2)) == (0x80FFFFFF, 0xFFFF)


def test_read_only_fields_keep_their_value_and_command_takes_its_bits(guest):
    guest.config_write(3, 0x00, 4, 0)
    guest.config_write(3, 0x08, 4, 0)
    assert (guest.config_read(3, 0x00), guest.config_read(3, 0x08)) == (0x56781234, 0xFF000003)
    guest.config_write(3, 0x04, 2, 0xFFFF)
    assert guest.config_read(3, 0x04, 2) == 0x0407
    guest.config_write(3, 0x3C, 1, 11)
    assert guest.config_read(3, 0x3C, 1) == 11
    assert guest.config_read(3, 0xFE, 4) == 0xFFFF0000             # past the 256 bytes: all ones


def test_bars_are_programmed_like_firmware_and_sized_by_writing_all_ones(guest):
    assert (guest.config_read(3, 0x10), guest.config_read(3, 0x14)) == (0xFEBFF000, 0xC001)
    assert guest.config_read(3, 0x04, 2) == int(pci.Command.IO | pci.Command.MEMORY)
    guest.config_write(3, 0x10, 4, 0xFFFFFFFF)
    guest.config_write(3, 0x14, 4, 0xFFFFFFFF)
    assert (guest.config_read(3, 0x10), guest.config_read(3, 0x14)) == (0xFFFFF000, 0xFFFFFFE1)
    assert guest.config_read(3, 0x18) == 0                         # no BAR 2: sizing reads 0
    guest.config_write(3, 0x10, 4, 0xFEBFF000)
    assert guest.config_read(3, 0x10) == 0xFEBFF000


def test_decoding_changes_are_reported_for_command_and_bars_only(guest):
    recorder = guest.host.functions[3]
    guest.config_write(3, 0x3C, 1, 5)
    guest.config_write(3, 0x0C, 1, 0x10)
    assert recorder.changes == 0
    guest.config_write(3, 0x04, 2, 3)
    guest.config_write(3, 0x14, 4, 0xC101)
    assert recorder.changes == 2


def test_windows_hand_accesses_to_the_bar_that_decodes_them(guest):
    recorder = guest.host.functions[3]
    assert guest.read(0xFEBFF010, 4) == 0xA5
    guest.outp(0xC01F, 1, 0x42)
    assert recorder.log == [("read", 0, 0x10, 4), ("write", 1, 0x1F, 1, 0x42)]
    assert (guest.inp(0xC020, 1), guest.read(0xFEBFE000, 4)) == (0xFF, 0xFFFFFFFF)   # past both BARs
    guest.config_write(3, 0x04, 2, int(pci.Command.IO))            # memory decoding off
    assert guest.read(0xFEBFF010, 4) == 0xFFFFFFFF
    guest.config_write(3, 0x14, 4, 0xC800)                         # the IO BAR moves
    assert guest.inp(0xC000, 1) == 0xFF and guest.inp(0xC804, 2) == 0xA5
    assert recorder.log[-1] == ("read", 1, 4, 2)


def test_bars_of_several_devices_do_not_overlap():
    host = PciHost()
    first, second = Recorder(), Recorder()
    host.add(1, first)
    host.add(2, second)
    assert [first.bar_address(i) for i in (0, 1)] == [0xFEBFF000, 0xC000]
    assert [second.bar_address(i) for i in (0, 1)] == [0xFEBFE000, 0xC020]


def test_misuse_is_refused_with_typed_errors():
    host = PciHost()
    host.add(4, Recorder())
    for device, match in ((0, "device=0"), (32, "device=32"), (True, "device=True"), (4, "already Recorder")):
        with pytest.raises(InvalidArgument, match=match):
            host.add(device, Recorder())
    with pytest.raises(InvalidArgument, match="PciFunction"):
        host.add(5, object())
    with pytest.raises(InvalidArgument, match="power of two"):
        Bar(BarKind.MEMORY, 0x1800)
    with pytest.raises(InvalidArgument, match="power of two from 16"):
        Bar(BarKind.MEMORY, 8)
    with pytest.raises(InvalidArgument, match="BarKind"):
        Bar(1, 0x100)
    with pytest.raises(InvalidArgument, match="has 6"):
        PciFunction(Identity(1, 2, 3), [Bar(BarKind.IO, 4)] * 7)
    big = PciFunction(Identity(1, 2, 3), [Bar(BarKind.MEMORY, 1 << 31)])
    with pytest.raises(InvalidArgument, match="no room left in the memory window"):
        host.add(6, big)
    with pytest.raises(NotImplementedError, match="bar_read"):
        big.bar_read(0, 0, 4)


# ---- pci-testdev --------------------------------------------------------------------------

class FakeIoeventfd:
    def __init__(self, log: list, args: tuple) -> None:
        self.log, self.args = log, args
        log.append(("assign", *args))

    def close(self) -> None:
        self.log.append(("deassign", *self.args))


class FakeVm:
    def __init__(self, capable: bool = True) -> None:
        self.log: list[tuple] = []
        self.capable = capable

    def ioeventfd(self, address: int, length: int = 4, pio: bool = False, datamatch: int | None = None):
        if not self.capable:
            raise CapabilityMissing("KVM_CAP_IOEVENTFD")
        return FakeIoeventfd(self.log, (address, length, pio, datamatch))


def booted_testdev(vm=None) -> tuple[Guest, PciTestdev]:
    host = PciHost()
    device = PciTestdev(lambda: vm)
    host.add(pci_testdev.DEVICE, device)
    return Guest(host), device


def read_header(read, base: int) -> tuple[int, int, int, int, str]:
    """As lib/pci-testdev.c: width, offset, data, count, and the name up to its NUL."""
    name = bytearray()
    while (byte := read(base + 16 + len(name), 1)) != 0:
        name.append(byte)
    return read(base + 1, 1), read(base + 4, 4), read(base + 8, 4), read(base + 12, 4), name.decode()


def test_pci_testdev_is_1b36_0005_at_device_2_with_qemus_bar_addresses():
    guest, _ = booted_testdev()
    assert guest.config_read(2, 0x00) == 0x00051B36
    assert (guest.config_read(2, 0x10), guest.config_read(2, 0x14), guest.config_read(2, 0x18)) == \
        (0xFEBFF000, 0xC001, 0)


@pytest.mark.parametrize("io", [False, True])
def test_pci_testdev_tests_count_writes_at_their_offset_and_end_with_width_0(io):
    guest, device = booted_testdev()
    base = 0xC000 if io else 0xFEBFF000
    read = guest.inp if io else guest.read
    write = guest.outp if io else guest.write
    prefix = "portio" if io else "mmio"
    names = []
    for number in range(3):
        write(base, 1, number)
        width, offset, data, count, name = read_header(lambda a, s: read(a, s), base)
        assert (width, count) == (4, 0) and offset >= 16 + len(name) + 1
        names.append(name)
        for _ in range(16):
            write(base + offset, width, data)
        write(base + offset + 4, 4, data)                          # elsewhere: not counted
        assert read(base + 12, 4) == 16                            # no VM: every write reached the device
    assert names == [f"{prefix}-no-eventfd", f"{prefix}-wildcard-eventfd", f"{prefix}-datamatch-eventfd"]
    write(base, 1, 3)
    assert (read(base + 1, 1), read(base + 12, 4)) == (0, 0)
    assert device.states[1 - io].selected == 0                     # the other BAR has its own test


def test_pci_testdev_assigns_ioeventfds_when_a_test_is_selected_and_drops_them_when_bars_change():
    vm = FakeVm()
    guest, device = booted_testdev(vm)
    guest.write(0xFEBFF000, 1, 0)
    guest.outp(0xC000, 1, 1)
    guest.outp(0xC000, 1, 2)                                       # already assigned in this BAR
    offsets = (pci_testdev.target(1), pci_testdev.target(2))
    data = pci_testdev.data(2)
    assert vm.log == [("assign", 0xFEBFF000 + offsets[0], 4, False, None),
                      ("assign", 0xFEBFF000 + offsets[1], 4, False, data),
                      ("assign", 0xC000 + offsets[0], 4, True, None),
                      ("assign", 0xC000 + offsets[1], 4, True, data)]
    vm.log.clear()
    guest.config_write(2, 0x14, 4, 0xC400)
    assert sorted(entry[0] for entry in vm.log) == ["deassign"] * 4
    vm.log.clear()
    guest.outp(0xC400, 1, 0)
    assert vm.log == [("assign", 0xC400 + offsets[0], 4, True, None), ("assign", 0xC400 + offsets[1], 4, True, data)]


def test_pci_testdev_without_ioeventfds_or_decoding_assigns_none():
    vm = FakeVm(capable=False)
    guest, device = booted_testdev(vm)
    guest.outp(0xC000, 1, 1)
    assert vm.log == [] and device.states[1].placed
    vm = FakeVm()
    guest, device = booted_testdev(vm)
    guest.config_write(2, 0x04, 2, int(pci.Command.MEMORY))
    guest.outp(0xC000, 1, 1)                                       # IO decoding off: not even decoded
    device.bar_write(1, 0, 1, 1)                                   # as if it were
    assert vm.log == [] and not device.states[1].placed


def test_machine_devices_option_is_checked():
    machine = Machine(KERNEL, memory=16, devices=["pci-testdev"])
    assert isinstance(machine.pci.functions[2], PciTestdev)
    assert 2 not in Machine(KERNEL, memory=16).pci.functions
    for devices, match in ((["bogus"], "'bogus' is not a device"), (["pci-testdev"] * 2, "named twice"),
                           ("pci-testdev", "expected a list"), ([1], "expected a list")):
        with pytest.raises(InvalidArgument, match=match):
            Machine(KERNEL, memory=16, devices=devices)


def test_the_boot_command_takes_device_options():
    from pykvm.boot import parser
    assert parser().parse_args(["kernel", "--device", "pci-testdev"]).device == ["pci-testdev"]
    assert parser().parse_args(["kernel"]).device == []
    with pytest.raises(SystemExit):
        parser().parse_args(["kernel", "--device", "virtio-rng-pci"])
