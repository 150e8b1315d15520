"""What one unittests.cfg entry asks of the machine, in pykvm's terms, or why pykvm cannot give it.

Why this exists: an entry's QEMU parameters (``-cpu``, ``-m``, ``-machine``,
``-device`` ...) describe the PC the test expects. Each one pykvm's
:class:`~pykvm.vmm.Machine` can give becomes a keyword of it; each one it
cannot give is a named reason to skip the entry, never a silent difference.
QEMU's own defaults as kvm-unit-tests starts it (``x86/run``: pc-testdev, the
debug-exit port, pci-testdev, 128 MiB, the PIT discarding lost ticks) are the
Machine's defaults too.

``-machine kernel-irqchip=split`` is taken only beside ``-device intel-iommu``
with ``intremap=on``: QEMU needs its userspace IOAPIC there so that IOAPIC
interrupts go through the IOMMU's remapping; pykvm keeps KVM's IOAPIC and the
Machine sends its PCI devices' interrupts on pins in remappable format through
the IOMMU itself (:mod:`pykvm.vmm.vtd`). Anywhere else split mode is a reason
to skip.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path

from ..vmm.machine import DEFAULT_MEMORY_MIB, OPTIONAL_DEVICES, Machine
from .config import Entry, shell_words

_MEMORY = re.compile(r"^(\d+(?:\.\d+)?)([kKmMgGtT]?)[bB]?$")
_MIB = {"": 1, "k": 1 / 1024, "m": 1, "g": 1024, "t": 1024 * 1024}
# Devices QEMU's x86/run adds to every run: the first two the Machine always has, the rest it adds on request.
BUILT_IN_DEVICES = ("pc-testdev", "isa-debug-exit")
X86_RUN_DEVICES = ("pci-testdev",)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The Machine for one entry: its keywords, the kernel's arguments, and what pykvm lacks for it."""

    kernel: Path
    cpus: int
    memory: int                 # MiB
    args: str                   # the kernel's command line after its own name (test_args)
    options: dict[str, object]  # further Machine keywords (cpu=..., pit=..., devices=...)
    missing: tuple[str, ...]    # why pykvm cannot run this entry as QEMU would; empty when it can

    def machine(self, **extra: object) -> Machine:
        # overcommit: QEMU maps -m lazily, and an entry asks for more than a small host has
        # ([la57]-style -m 3G in the 2 GiB tcg-amd host); its kernel touches little of it.
        return Machine(self.kernel, cpus=self.cpus, memory=self.memory, cmdline=self.args, overcommit=True,
                       **self.options, **extra)  # type: ignore[arg-type]


def plan(entry: Entry, tree: Path) -> Plan:
    """The plan for ``entry`` of the kvm-unit-tests tree ``tree``."""
    words = shell_words(entry.qemu_params, tree)
    smp = shell_words(entry.smp, tree)
    cpus = int(smp[0]) if len(smp) == 1 and smp[0].isdigit() else 0
    missing: list[str] = [] if cpus > 0 else [f"smp = {entry.smp!r} is not a number of CPUs"]
    memory = DEFAULT_MEMORY_MIB
    # x86/run's own: pci-testdev, and -global kvm-pit.lost_tick_policy=discard
    options: dict[str, object] = {"devices": X86_RUN_DEVICES, "pit_reinject": False}
    for option, value in _options(words, missing):
        if option == "-m":
            memory = _memory(value, missing)
        elif option == "-smp":
            cpus = int(value.split(",")[0]) if value.split(",")[0].isdigit() else cpus
        elif option == "-cpu":
            options["cpu"] = value
        elif option in ("-machine", "-M"):
            _machine(value, options, missing)
        elif option == "-device":
            _device(value, options, missing)
        elif option == "-enable-kvm":
            pass                                    # pykvm is always KVM
        elif option == "-global" and value.startswith("kvm-pit.lost_tick_policy="):
            policy = value.partition("=")[2]
            if policy in ("discard", "delay"):
                options["pit_reinject"] = policy == "delay"
            else:
                missing.append(f"-global {value}: pykvm's PIT discards or delays (re-injects) lost ticks")
        else:
            missing.append(f"{option} {value}".strip() + ": a QEMU option pykvm's Machine does not model")
    if options.pop("split_irqchip", False) and not options.get("intremap"):
        missing.append("-machine kernel-irqchip=split: pykvm's Machine keeps KVM's IOAPIC; it models split "
                       "mode's effect only for intel-iommu's interrupt remapping")
    args = " ".join(shell_words(entry.test_args, tree))
    return Plan(entry.kernel(tree), max(cpus, 1), memory, args, options, tuple(missing))


_TAKES_VALUE = {"-m", "-smp", "-cpu", "-machine", "-M", "-device", "-overcommit", "-initrd", "-global",
                "-append", "-object", "-chardev", "-numa", "-accel"}


def _options(words: list[str], missing: list[str]) -> Iterator[tuple[str, str]]:
    index = 0
    while index < len(words):
        word = words[index]
        if word in _TAKES_VALUE:
            if index + 1 >= len(words):
                missing.append(f"{word} has no value")
                return
            yield word, words[index + 1]
            index += 2
        else:
            yield word, ""
            index += 1


def _memory(value: str, missing: list[str]) -> int:
    match = _MEMORY.match(value.split(",")[0])
    if match is None:
        missing.append(f"-m {value}: not a size pykvm reads (e.g. 2048, 4g)")
        return DEFAULT_MEMORY_MIB
    return int(float(match.group(1)) * _MIB[match.group(2).lower()])


def _machine(value: str, options: dict[str, object], missing: list[str]) -> None:
    for part in value.split(","):
        key, _, setting = part.partition("=")
        if key in ("pc", "accel") or (key == "accel" and setting == "kvm"):
            continue
        if key == "pit" and setting in ("off", "on"):
            options["pit"] = setting == "on"
        elif key == "vmport" and setting == "on":
            continue                                # the Machine always has the VMware backdoor port
        elif key == "q35" and not setting:
            options["chipset"] = "q35"
        elif key == "kernel-irqchip" and setting == "split":
            options["split_irqchip"] = True         # checked once the devices are known (plan())
        else:
            missing.append(f"-machine {part}: pykvm's Machine is an i440FX-like PC without that option")


def _device(value: str, options: dict[str, object], missing: list[str]) -> None:
    name = value.split(",")[0]
    devices = options["devices"]
    assert isinstance(devices, tuple)
    if name in BUILT_IN_DEVICES or name in devices:
        return
    if name == "intel-iommu" and _iommu_options(value, options):
        options["devices"] = (*devices, name)
    elif name in OPTIONAL_DEVICES and value == name:
        options["devices"] = (*devices, name)
    else:
        missing.append(f"-device {value}: pykvm's Machine has no such device")


def _iommu_options(value: str, options: dict[str, object]) -> bool:
    """Whether pykvm's IOMMU has what ``-device intel-iommu,...`` asks (and set ``intremap``)."""
    for part in value.split(",")[1:]:
        key, _, setting = part.partition("=")
        if key == "intremap" and setting in ("on", "off"):
            options["intremap"] = setting == "on"
        elif not (key == "eim" and setting == "off"):
            return False                            # eim=on, aw-bits, caching-mode ...: not modelled
    return True
