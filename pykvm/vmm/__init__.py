"""A small VMM on pykvm: boot a Multiboot kernel with a serial port, fw_cfg and the in-kernel irqchip.

``python -m pykvm.boot KERNEL`` on the command line; from Python::

    from pykvm.vmm import Machine
    result = Machine("kernel.elf", cpus=2, memory=64, cmdline="exit=3").run(timeout=10)
    assert result.status == 7 and "exiting with 3" in result.text

One module per device (``serial``, ``debug_exit``, ``fw_cfg``, ``cmos``,
``testdev``, ``pci_testdev``, ``edu``, the ``vtd`` IOMMU ...), the buses
(``bus``), the loader (``multiboot``), the machine (``machine``), the test
kernels (``testkernels``) and the boot benchmark (``bench``).
"""

from .bus import Device, ExitSite, UnknownAccess
from .fw_cfg import FwCfg, FwCfgError, FwCfgKey
from .machine import (
    STATUS_INTERNAL_ERROR,
    STATUS_POWER_OFF,
    STATUS_STRICT_IO,
    STATUS_TIMEOUT,
    STATUS_TRIPLE_FAULT,
    BootResult,
    Ending,
    Machine,
)
from .multiboot import MultibootError

__all__ = ["Machine", "BootResult", "Ending", "Device", "ExitSite", "UnknownAccess", "FwCfg", "FwCfgKey",
           "FwCfgError", "MultibootError", "STATUS_POWER_OFF", "STATUS_TRIPLE_FAULT", "STATUS_INTERNAL_ERROR",
           "STATUS_STRICT_IO", "STATUS_TIMEOUT"]
