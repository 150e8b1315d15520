"""QEMU's edu device (pykvm.vmm.edu) and the q35 machine with intel-iommu that kvm-unit-tests' intel_iommu boots.

The device on fakes (guest memory, an identity or refusing DMA path, recorded
INTx levels and MSIs): what a driver reads back from BAR0 and the
configuration space, what the DMA engine copies, which interrupts it raises.
With ``PYKVM_KUT_DIR``, the ``intel_iommu`` flat boots on the machine its cfg
entry asks for, and its interrupts are seen going through the remapping
table.
"""

from __future__ import annotations

import pytest

from pykvm.core.errors import InvalidArgument
from pykvm.unittests.config import parse_config
from pykvm.unittests.plan import plan
from pykvm.vmm import Ending, Machine, edu, testkernels, vtd
from pykvm.vmm.edu import Edu, Reg
from pykvm.vmm.pci import Register
from pykvm.vmm.pci_testdev import PciTestdev

KERNEL = testkernels.path("hello")
LINE = 11
RAM = 0x5000


class Memory:
    def __init__(self) -> None:
        self.data = bytearray(0x10000)

    def read(self, gpa: int, size: int) -> bytes:
        return bytes(self.data[gpa:gpa + size])

    def write(self, gpa: int, data: bytes) -> None:
        self.data[gpa:gpa + len(data)] = data


class Wires:
    """What the device sends out: INTx levels per line, MSIs, and the DMA requests (refused if ``refuse``)."""

    def __init__(self) -> None:
        self.memory = Memory()
        self.intx: list[tuple[int, int]] = []
        self.msis: list[tuple[int, int]] = []
        self.refuse = False

    def dma(self, address: int, size: int, write: bool) -> list[tuple[int, int]]:
        if self.refuse:
            raise vtd.DmaFault(vtd.FaultReason.CONTEXT_NOT_PRESENT)
        return [(address, size)]

    def device(self) -> Edu:
        return Edu(lambda: self.memory, self.dma, lambda line, level: self.intx.append((line, level)),
                   lambda address, data: self.msis.append((address, data)), LINE)


@pytest.fixture
def wires() -> Wires:
    return Wires()


@pytest.fixture
def device(wires) -> Edu:
    return wires.device()


def dma(device: Edu, source: int, destination: int, count: int, command: int) -> None:
    for register, value in ((Reg.DMA_SRC, source), (Reg.DMA_DST, destination), (Reg.DMA_COUNT, count)):
        device.bar_write(0, register, 8, value)
    device.bar_write(0, Reg.DMA_CMD, 4, command)


@pytest.mark.host_independent
def test_identity_liveness_and_factorial(device):
    assert device.bar_read(0, Reg.ID, 4) == 0x010000ED
    device.bar_write(0, Reg.ALIVE, 4, 0x12345678)
    assert device.bar_read(0, Reg.ALIVE, 4) == ~0x12345678 & 0xFFFFFFFF
    device.bar_write(0, Reg.FACTORIAL, 4, 5)
    assert device.bar_read(0, Reg.FACTORIAL, 4) == 120 and device.bar_read(0, Reg.STATUS, 4) & 1 == 0
    device.bar_write(0, Reg.FACTORIAL, 4, 40)
    assert device.bar_read(0, Reg.FACTORIAL, 4) == 0            # 40! in 32 bits


@pytest.mark.host_independent
def test_the_configuration_space_has_the_ids_pin_line_and_a_64_bit_msi_capability(device):
    assert device.config_read(Register.VENDOR_ID, 4) == 0x11E81234
    assert device.config_read(Register.CLASS_CODE, 3) == 0x00FF00
    assert device.config_read(Register.INTERRUPT_PIN, 1) == 1 and device.config_read(Register.INTERRUPT_LINE, 1) == LINE
    assert device.config_read(0x06, 2) & 1 << 4                              # status: capability list
    cap = device.config_read(0x34, 1)
    assert device.config_read(cap, 2) == edu.MSI_CAPABILITY_ID              # ID, next 0
    assert device.config_read(cap + 2, 2) == edu.MSI_64BIT                  # 64-bit, one vector, disabled
    device.config_write(cap + 2, 2, 0xFFFF)
    assert device.config_read(cap + 2, 2) == edu.MSI_64BIT | edu.MSI_ENABLE    # only enable is writable
    assert device.bars[0].size == 1 << 20


@pytest.mark.host_independent
def test_dma_copies_ram_to_the_buffer_and_back(device, wires):
    wires.memory.write(RAM, b"\x78\x56\x34\x12")
    dma(device, RAM, edu.BUFFER_ADDRESS, 4, 0x1)                            # RAM -> device
    assert device.buffer[:4] == b"\x78\x56\x34\x12"
    assert device.bar_read(0, Reg.DMA_CMD, 4) & 1 == 0                      # done: the guest's poll ends
    dma(device, edu.BUFFER_ADDRESS, RAM + 4, 4, 0x3)                        # device -> RAM
    assert wires.memory.read(RAM + 4, 4) == b"\x78\x56\x34\x12"
    assert wires.intx == []                                                 # no interrupt asked


@pytest.mark.host_independent
def test_a_refused_dma_copies_nothing_and_still_completes_with_its_interrupt(device, wires):
    wires.memory.write(RAM, b"abcd")
    wires.refuse = True
    dma(device, RAM, edu.BUFFER_ADDRESS, 4, 0x1 | 0x4)
    assert device.buffer[:4] == bytes(4) and device.bar_read(0, Reg.DMA_CMD, 4) & 1 == 0
    assert device.bar_read(0, Reg.INTR_STATUS, 4) == edu.DMA_INTERRUPT and wires.intx == [(LINE, 1)]


@pytest.mark.host_independent
def test_intx_follows_the_interrupt_status(device, wires):
    device.bar_write(0, Reg.INTR_RAISE, 4, 1)
    device.bar_write(0, Reg.INTR_RAISE, 4, 2)                               # already asserted: no new edge
    assert device.bar_read(0, Reg.INTR_STATUS, 4) == 3 and wires.intx == [(LINE, 1)]
    device.bar_write(0, Reg.INTR_ACK, 4, 1)
    assert wires.intx == [(LINE, 1)]
    device.bar_write(0, Reg.INTR_ACK, 4, 2)
    assert wires.intx == [(LINE, 1), (LINE, 0)]
    device.bar_write(0, Reg.INTR_RAISE, 4, 0)                               # raising nothing asserts nothing
    assert wires.intx == [(LINE, 1), (LINE, 0)] and wires.msis == []


@pytest.mark.host_independent
def test_with_msi_enabled_each_raise_sends_the_programmed_message_and_intx_stays_low(device, wires):
    cap = edu.MSI_CAPABILITY
    device.config_write(cap + edu.Msi.ADDRESS_LO, 4, 0xFEE00050)
    device.config_write(cap + edu.Msi.ADDRESS_HI, 4, 0)
    device.config_write(cap + edu.Msi.DATA, 2, 0x0)
    device.config_write(cap + edu.Msi.CONTROL, 2, edu.MSI_ENABLE)
    device.bar_write(0, Reg.INTR_RAISE, 4, 1)
    device.bar_write(0, Reg.INTR_RAISE, 4, 1)
    assert wires.msis == [(0xFEE00050, 0)] * 2 and wires.intx == []


# -- the machine ------------------------------------------------------------------------------------

@pytest.mark.host_independent
def test_q35_numbers_the_devices_from_1_and_i440fx_from_2():
    q35 = Machine(KERNEL, memory=16, chipset="q35", devices=("pci-testdev", "edu", "intel-iommu"), intremap=True)
    assert isinstance(q35.pci.functions[1], PciTestdev) and isinstance(q35.pci.functions[2], Edu)
    assert q35.pci.functions[0].identity.device == 0x29C0 and q35.iommu is not None
    assert q35.pci.functions[2].bar_address(0) == 0xFEA00000               # where QEMU's firmware puts it
    pc = Machine(KERNEL, memory=16, devices=("pci-testdev", "edu"))
    assert isinstance(pc.pci.functions[3], Edu) and pc.iommu is None


@pytest.mark.host_independent
@pytest.mark.parametrize("keywords, match", [
    ({"chipset": "isapc"}, "chipset='isapc': choose one of i440fx, q35"),
    ({"devices": ("intel-iommu",)}, "'intel-iommu' needs chipset='q35'"),
    ({"chipset": "q35", "intremap": True}, "add 'intel-iommu' to devices"),
    ({"chipset": "q35", "devices": ("intel-iommu",), "intremap": 1}, "intremap=1: expected True or False"),
])
def test_the_chipset_and_iommu_keywords_are_checked(keywords, match):
    with pytest.raises(InvalidArgument, match=match):
        Machine(KERNEL, memory=16, **keywords)


def test_kut_intel_iommu_passes_with_interrupts_through_the_remapping_table(kvm, kut_flat):
    machine = Machine(kut_flat("intel-iommu"), kvm=kvm, cpus=4, chipset="q35",
                      devices=("pci-testdev", "intel-iommu", "edu"), intremap=True)
    assert machine.iommu is not None
    remapped: list[tuple[str, int]] = []
    for path in ("remap_ioapic", "remap_msi"):
        original = getattr(machine.iommu, path)

        def record(*args, original=original, path=path):
            message = original(*args)
            remapped.append((path, None if message is None else message.data & 0xFF))
            return message
        setattr(machine.iommu, path, record)
    result = machine.run(timeout=60)
    assert result.ending == Ending.EXIT_PORT and result.status == 1, f"{result.message}\n{result.text}"
    passed = [line for line in result.lines if line.startswith("PASS: ")]
    assert len(passed) == 11 and "PASS: vtd_dmar: DMAR 4B memcpy test" in passed, result.text
    # the IRTEs' vectors (index 1: 0xed for the IOAPIC pin, index 2: 0xee for the MSI) reached the guest
    assert remapped == [("remap_ioapic", 0xED), ("remap_msi", 0xEE)], remapped


def test_kut_intel_iommu_without_edu_skips_the_device_tests(kvm, kut_flat):
    # the control: the same flat without the device reports its three device tests skipped
    result = Machine(kut_flat("intel-iommu"), kvm=kvm, cpus=4, chipset="q35", devices=("intel-iommu",),
                     intremap=True).run(timeout=60)
    assert sum(line.startswith("PASS: ") for line in result.lines) == 8, result.text
    assert sum(line.startswith("SKIP: ") for line in result.lines) == 3, result.text


# -- the unittests plan ---------------------------------------------------------------------------

IOMMU_CFG = """\
[intel_iommu]
file = intel-iommu.flat
smp = 4
qemu_params = -M q35,kernel-irqchip=split -device intel-iommu,intremap=on,eim=off -device edu

[split_alone]
file = intel-iommu.flat
qemu_params = -M q35,kernel-irqchip=split

[eim]
file = intel-iommu.flat
qemu_params = -M q35 -device intel-iommu,intremap=on,eim=on
"""


@pytest.mark.host_independent
def test_the_plan_gives_the_intel_iommu_entry_its_machine_and_skips_what_it_cannot_model(tmp_path):
    entries = {entry.name: entry for entry in parse_config(IOMMU_CFG)}
    iommu = plan(entries["intel_iommu"], tmp_path)
    assert iommu.missing == () and iommu.cpus == 4
    assert iommu.options == {"devices": ("pci-testdev", "intel-iommu", "edu"), "pit_reinject": False,
                             "chipset": "q35", "intremap": True}
    # split mode is taken only for the IOMMU's interrupt remapping; EIM is not modelled
    assert any("kernel-irqchip=split" in reason for reason in plan(entries["split_alone"], tmp_path).missing)
    assert any("eim=on" in reason for reason in plan(entries["eim"], tmp_path).missing)


@pytest.mark.host_independent
def test_the_status_register_keeps_computing_read_only_and_a_factorial_can_interrupt(device, wires):
    device.bar_write(0, Reg.STATUS, 4, 0x81)
    assert device.bar_read(0, Reg.STATUS, 4) == 0x80
    device.bar_write(0, Reg.FACTORIAL, 4, 4)
    assert device.bar_read(0, Reg.FACTORIAL, 4) == 24
    assert device.bar_read(0, Reg.INTR_STATUS, 4) == edu.FACTORIAL_INTERRUPT and wires.intx == [(LINE, 1)]
