"""The interrupt side of the KVM API: irqchip modes, GSI routes, MSI messages, PIT state.

Why this exists: where interrupt controllers live decides which injection
paths a VM has. With ``none`` userspace injects with ``KVM_INTERRUPT``; with
``kernel`` KVM emulates the 8259 PICs, the IOAPIC and every LAPIC, and
interrupts enter through GSIs (``KVM_IRQ_LINE``, irqfd) or MSIs; with
``split`` only the LAPICs are in the kernel and GSIs must be routed as MSIs.
This module names the modes, says what each allows, and checks routing
entries, MSI messages and vectors before KVM sees them, so a mistake gets a
message instead of EINVAL. These are the records the ioctls take; what the
chips' registers mean is :mod:`pykvm.irqchip`'s business.
"""

from __future__ import annotations

import dataclasses
import enum

from .constants import IOAPIC_NUM_PINS, PIC_PINS, IrqchipId, RoutingType
from .errors import ArgumentTypeError, InvalidMsi, InvalidRouting, InvalidVector

MAX_IRQ_ROUTES = 4096     # KVM_MAX_IRQ_ROUTES on x86 (include/linux/kvm_host.h)
PINS_PER_PIC = 8


def check_vector(vector: int) -> None:
    """Raise :class:`ArgumentTypeError` unless ``vector`` is an integer (not a bool or a string), and
    :class:`InvalidVector` unless it is in 0..255."""
    if not isinstance(vector, bool) and not isinstance(vector, int):
        raise ArgumentTypeError(f"interrupt vector {vector!r}: expected an integer, got {type(vector).__name__}; "
                                f"write it as a number, e.g. 0x40")
    if isinstance(vector, bool) or not 0 <= vector <= 255:
        raise InvalidVector(f"interrupt vector {vector!r} is out of range: x86 vectors are "
                            f"0..255 (external interrupts normally use 32..255)")


# Exceptions for which the CPU pushes an error code in protected and long mode (never
# in real mode): #DF 8, #TS 10, #NP 11, #SS 12, #GP 13, #PF 14, #AC 17, #CP 21, #VC 29,
# #SX 30 (Intel SDM Vol. 3A 6.15, AMD APM Vol. 2 8.2). pykvm.x86.vectors re-exports it.
ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})
EXCEPTION_VECTORS = range(32)      # vectors KVM_SET_VCPU_EVENTS takes as exceptions
NMI_VECTOR, DEBUG_VECTOR, PAGE_FAULT_VECTOR = 2, 1, 14
PAYLOAD_VECTORS = frozenset({DEBUG_VECTOR, PAGE_FAULT_VECTOR})   # KVM's exception payloads


def _plain_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_exception(vector: int, error_code: int | None = None, address: int | None = None) -> None:
    """Raise :class:`InvalidVector` for an exception KVM_SET_VCPU_EVENTS must not be given.

    Checks what needs no vCPU state: ``vector`` an integer 0..31 other than 2 (NMI),
    ``error_code`` a 32-bit integer and only on :data:`ERROR_CODE_VECTORS`, ``address``
    (the payload: CR2 for #PF, DR6 bits for #DB) a 64-bit integer and only on those
    two. Whether an error-code vector may go without one depends on the CPU mode
    (real mode pushes none); :meth:`pykvm.injection.Injector.exception` checks that.
    """
    if not _plain_int(vector) or vector not in EXCEPTION_VECTORS:
        raise InvalidVector(f"exception(vector={vector!r}): exceptions are the integer "
                            f"vectors 0..31; deliver vectors 32..255 as interrupts "
                            f"(vcpu.interrupt(), an MSI or an irqchip line)")
    if vector == NMI_VECTOR:
        raise InvalidVector("exception(vector=2): vector 2 is the NMI, which KVM does not "
                            "take as an exception; use vcpu.nmi()")
    if error_code is not None:
        if not _plain_int(error_code) or not 0 <= error_code <= 0xFFFFFFFF:
            raise InvalidVector(f"exception({vector}, error_code={error_code!r}): an error "
                                f"code is an unsigned 32-bit integer (0..0xffffffff)")
        if vector not in ERROR_CODE_VECTORS:
            raise InvalidVector(f"exception({vector}, error_code={error_code:#x}): vector "
                                f"{vector} pushes no error code; drop error_code (the vectors "
                                f"that take one are {sorted(ERROR_CODE_VECTORS)})")
    if address is not None:
        if vector not in PAYLOAD_VECTORS:
            raise InvalidVector(f"exception({vector}, address={address!r}): only #PF (14, "
                                f"the faulting address for CR2) and #DB (1, the DR6 bits) carry "
                                f"a payload; drop address")
        if not _plain_int(address) or not 0 <= address < 1 << 64:
            raise InvalidVector(f"exception({vector}, address={address!r}): the address "
                                f"is an unsigned 64-bit integer")


class DeliveryMode(enum.IntEnum):
    """Interrupt delivery modes of MSIs, IOAPIC entries, LVT entries and the ICR."""

    FIXED = 0
    LOWEST_PRIORITY = 1
    SMI = 2
    NMI = 4
    INIT = 5
    STARTUP = 6
    EXTINT = 7


MSI_ADDRESS_BASE = 0xFEE00000    # the interrupt message range (and the default xAPIC base)


@dataclasses.dataclass(frozen=True)
class MsiMessage:
    """An x86 MSI as ``KVM_SIGNAL_MSI`` and MSI routes take it (``struct kvm_msi``).

    Built directly from address and data (checked: :func:`validate_msi`), or from
    its fields with :meth:`compose`.
    """

    address_lo: int
    address_hi: int
    data: int

    @classmethod
    def compose(cls, destination: int, vector: int,
                delivery_mode: DeliveryMode = DeliveryMode.FIXED, logical: bool = False,
                redirection_hint: bool = False, trigger_level: bool = False,
                level_assert: bool = True) -> MsiMessage:
        """Address 0xFEE<dest:8><rsvd:8><RH><DM>00, data <trigger><level><rsvd:3><mode:3><vector:8>.

        Destinations are 8-bit APIC IDs (extended x2APIC destinations in address_hi
        are not composed).
        """
        check_vector(vector)
        if not _plain_int(destination):
            raise ArgumentTypeError(f"destination={destination!r}: expected an integer APIC ID, got "
                                    f"{type(destination).__name__}")
        if not _plain_int(delivery_mode) or delivery_mode not in set(DeliveryMode):
            raise InvalidMsi(f"delivery_mode={delivery_mode!r}: choose a DeliveryMode member")
        if not 0 <= destination <= 0xFF:
            raise InvalidMsi(f"destination={destination!r} does not fit the MSI's 8-bit "
                             f"destination field; use an APIC ID 0..255")
        address = (MSI_ADDRESS_BASE | destination << 12 | int(redirection_hint) << 3
                   | int(logical) << 2)
        data = vector | int(delivery_mode) << 8 | int(level_assert) << 14 | int(trigger_level) << 15
        return cls(address, 0, data)

    def __post_init__(self) -> None:
        for name in ("address_lo", "address_hi"):
            value = getattr(self, name)
            if not _plain_int(value) or not 0 <= value < 1 << 32:
                raise InvalidMsi(f"MsiMessage({name}={value!r}): expected a 32-bit unsigned integer")
        validate_msi(self.address, self.data)

    @property
    def address(self) -> int:
        return self.address_hi << 32 | self.address_lo

    @property
    def destination(self) -> int:
        return self.address_lo >> 12 & 0xFF

    @property
    def vector(self) -> int:
        return self.data & 0xFF

    @property
    def delivery_mode(self) -> int:
        return self.data >> 8 & 7

    @property
    def logical(self) -> bool:
        return bool(self.address_lo >> 2 & 1)


def validate_msi(address: int, data: int) -> None:
    """Raise :class:`InvalidMsi` for an address/data pair with reserved bits set."""
    for name, value in (("address", address), ("data", data)):
        if not _plain_int(value):
            raise ArgumentTypeError(f"MSI {name}={value!r}: expected an integer, got {type(value).__name__}")
    if not 0 <= address < 1 << 64 or not 0 <= data < 1 << 32:
        raise InvalidMsi(f"MSI address {address!r} / data {data!r}: the address is 64 bits and "
                         f"the data 32 bits, both unsigned")
    low = address & 0xFFFFFFFF
    if low >> 20 != MSI_ADDRESS_BASE >> 20:
        raise InvalidMsi(f"MSI address {address:#x}: bits 31:20 must be 0xFEE (the interrupt "
                         f"message range); compose it with MsiMessage.compose()")
    if low & 0x3:
        raise InvalidMsi(f"MSI address {address:#x}: bits 1:0 are reserved and must be 0")
    if data >> 16:
        raise InvalidMsi(f"MSI data {data:#x}: bits 31:16 are reserved and must be 0")
    if data >> 11 & 7:
        raise InvalidMsi(f"MSI data {data:#x}: bits 13:11 are reserved and must be 0")
    mode = data >> 8 & 7
    if mode in (3, 6):
        raise InvalidMsi(f"MSI data {data:#x}: delivery mode {mode} is reserved for MSIs")
    if mode in (DeliveryMode.FIXED, DeliveryMode.LOWEST_PRIORITY) and data & 0xFF < 16:
        raise InvalidMsi(f"MSI data {data:#x}: vector {data & 0xFF} is illegal for fixed delivery "
                         f"(vectors 0-15 are reserved); use 16..255")


class IrqchipMode(str, enum.Enum):
    """Where the interrupt controllers of a VM live (``Kvm.create_vm(irqchip=...)``)."""

    NONE = "none"        # userspace irqchip: KVM_INTERRUPT, no LAPIC
    KERNEL = "kernel"    # KVM_CREATE_IRQCHIP: PICs + IOAPIC + LAPICs in the kernel
    SPLIT = "split"      # KVM_CAP_SPLIT_IRQCHIP: LAPICs in the kernel, PIC/IOAPIC in userspace

    @property
    def lapic_in_kernel(self) -> bool:
        return self != IrqchipMode.NONE

    @property
    def ioapic_in_kernel(self) -> bool:
        return self == IrqchipMode.KERNEL


@dataclasses.dataclass(frozen=True)
class IrqchipRoute:
    """GSI ``gsi`` drives ``pin`` of an in-kernel PIC or the IOAPIC."""

    gsi: int
    chip: IrqchipId
    pin: int

    def __post_init__(self) -> None:
        _check_integers(self, "gsi", "pin")
        if isinstance(self.chip, bool) or self.chip not in set(IrqchipId):
            raise InvalidRouting(f"IrqchipRoute(gsi={self.gsi}, chip={self.chip!r}): not an in-kernel chip; use "
                                 f"{', '.join(f'IrqchipId.{c.name} ({c.value})' for c in IrqchipId)}")

    def validate(self, mode: IrqchipMode) -> None:
        _check_gsi(self.gsi)
        if not mode.ioapic_in_kernel:
            raise InvalidRouting(f"GSI {self.gsi}: an irqchip route needs the in-kernel PIC/IOAPIC, "
                                 f"but this VM's irqchip is {mode.value!r}; route it as an MSI "
                                 f"(MsiRoute) or create the VM with irqchip='kernel'")
        pins = IOAPIC_NUM_PINS if self.chip == IrqchipId.IOAPIC else PINS_PER_PIC
        if not 0 <= self.pin < pins:
            raise InvalidRouting(f"GSI {self.gsi}: {IrqchipId(self.chip).name} has pins 0..{pins - 1}, "
                                 f"not {self.pin}")

    def to_c(self, entry) -> None:
        entry.gsi, entry.type = self.gsi, RoutingType.IRQCHIP
        entry.u.irqchip.irqchip, entry.u.irqchip.pin = int(self.chip), self.pin


@dataclasses.dataclass(frozen=True)
class MsiRoute:
    """GSI ``gsi`` sends MSI ``message`` (see :meth:`MsiMessage.compose`)."""

    gsi: int
    message: MsiMessage

    def __post_init__(self) -> None:
        _check_integers(self, "gsi")

    def validate(self, mode: IrqchipMode) -> None:
        _check_gsi(self.gsi)
        if not mode.lapic_in_kernel:
            raise InvalidRouting(f"GSI {self.gsi}: MSI routes need an in-kernel LAPIC; create the VM "
                                 f"with irqchip='kernel' or 'split'")
        if not isinstance(self.message, MsiMessage):
            raise InvalidRouting(f"MsiRoute(gsi={self.gsi}, message={self.message!r}): the "
                                 f"message must be an MsiMessage (MsiMessage.compose(...))")

    def to_c(self, entry) -> None:
        entry.gsi, entry.type = self.gsi, RoutingType.MSI
        msi = entry.u.msi
        msi.address_lo, msi.address_hi, msi.data = (self.message.address_lo,
                                                   self.message.address_hi, self.message.data)


Route = IrqchipRoute | MsiRoute


def _check_integers(route: object, *names: str) -> None:
    """ArgumentTypeError for a field of ``route`` among ``names`` that is not an int (bool refused)."""
    for name in names:
        value = getattr(route, name)
        if not _plain_int(value):
            raise ArgumentTypeError(f"{type(route).__name__}({name}={value!r}): expected an integer, got "
                                    f"{type(value).__name__}")


def _check_gsi(gsi: int) -> None:
    if not 0 <= gsi < MAX_IRQ_ROUTES:
        raise InvalidRouting(f"GSI {gsi} is out of range: KVM routes GSIs 0..{MAX_IRQ_ROUTES - 1}")


def default_routes(mode: IrqchipMode) -> tuple[Route, ...]:
    """The routing KVM installs itself: with ``kernel``, GSI 0-15 to both PICs and IOAPIC, 16-23 to the IOAPIC.

    (``kvm_setup_default_irq_routing``; GSI 2 goes to IOAPIC pin 2 and to the
    master PIC's cascade pin, as in KVM.) ``none`` and ``split`` start empty.
    """
    if mode != IrqchipMode.KERNEL:
        return ()
    routes: list[Route] = []
    for gsi in range(IOAPIC_NUM_PINS):
        if gsi < PIC_PINS:
            chip = IrqchipId.PIC_MASTER if gsi < PINS_PER_PIC else IrqchipId.PIC_SLAVE
            routes.append(IrqchipRoute(gsi, chip, gsi % PINS_PER_PIC))
        routes.append(IrqchipRoute(gsi, IrqchipId.IOAPIC, gsi))
    return tuple(routes)


@dataclasses.dataclass(frozen=True)
class PitChannel:
    """One 8254 channel as ``KVM_GET_PIT2`` reports it (``struct kvm_pit_channel_state``)."""

    count: int              # the reload value; 0 stands for 65536
    latched_count: int
    count_latched: int
    status_latched: int
    status: int
    read_state: int
    write_state: int
    write_latch: int
    rw_mode: int            # 1 LSB, 2 MSB, 3 LSB then MSB
    mode: int               # 0-5; KVM reports 0xff for a channel never programmed
    bcd: int
    gate: int
    count_load_time: int


@dataclasses.dataclass(frozen=True)
class PitState:
    """``struct kvm_pit_state2``: the three channels and KVM's PIT flags."""

    channels: tuple[PitChannel, ...]     # three: channel 0 drives GSI 0
    flags: int
