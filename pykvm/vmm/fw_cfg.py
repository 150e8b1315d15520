"""QEMU's fw_cfg, the port interface: selector at 0x510 (16-bit writes), data at 0x511 (byte reads).

Why this exists: unmodified kernels and firmware (kvm-unit-tests, SeaBIOS-style
code) ask fw_cfg how many CPUs and how much RAM there are, and read the memory
map from the file ``etc/e820``. The keys are QEMU's numbers
(``include/standard-headers/linux/qemu_fw_cfg.h``); the file directory (key
0x19) is a big-endian count followed by 64-byte entries (size, select, name).
No DMA interface: the ID item says so (bit 1 clear).

The model is pure Python; a misuse (a name too long, a key taken twice, a file
key chosen by hand) raises :class:`FwCfgError` naming what is wrong.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence

from ..core.errors import PyKvmError

SELECTOR_PORT = 0x510
DATA_PORT = 0x511
PORTS = 2                         # 0x510 and 0x511 (the DMA registers at 0x514 are not there)
FILE_NAME_SIZE = 56               # including the NUL
MAX_KEY = 0x3FFF                  # the low 14 bits select; 0x4000 is the write flag, 0x8000 arch-local
WRITE_FLAG = 0x4000
ARCH_LOCAL = 0x8000
FEATURE_TRADITIONAL = 1           # the port interface (ID bit 0); bit 1 (DMA) stays clear


class FwCfgKey(enum.IntEnum):
    """QEMU's fixed fw_cfg keys (those pykvm fills in, and their neighbours)."""

    SIGNATURE = 0x00
    ID = 0x01
    UUID = 0x02
    RAM_SIZE = 0x03
    NOGRAPHIC = 0x04
    NB_CPUS = 0x05
    MACHINE_ID = 0x06
    KERNEL_ADDR = 0x07
    KERNEL_SIZE = 0x08
    KERNEL_CMDLINE = 0x09
    INITRD_ADDR = 0x0A
    INITRD_SIZE = 0x0B
    BOOT_DEVICE = 0x0C
    NUMA = 0x0D
    BOOT_MENU = 0x0E
    MAX_CPUS = 0x0F
    KERNEL_ENTRY = 0x10
    KERNEL_DATA = 0x11
    INITRD_DATA = 0x12
    CMDLINE_ADDR = 0x13
    CMDLINE_SIZE = 0x14
    CMDLINE_DATA = 0x15
    FILE_DIR = 0x19
    FILE_FIRST = 0x20
    E820_TABLE = ARCH_LOCAL | 0x03      # x86: the legacy e820 table (count + entries)


class FwCfgError(PyKvmError, ValueError):
    """A bad fw_cfg item or file; the message names it."""


class FwCfg:
    """The fw_cfg device: items by key, files in a directory, and the guest's read cursor."""

    def __init__(self) -> None:
        self._items: dict[int, bytes] = {}
        self._files: list[tuple[str, int]] = []       # (name, key), in insertion order
        self._selected = 0
        self._offset = 0
        self.add(FwCfgKey.SIGNATURE, b"QEMU")
        self.add(FwCfgKey.ID, struct.pack("<I", FEATURE_TRADITIONAL))
        self._update_directory()

    @classmethod
    def for_machine(cls, memory: int, cpus: int, max_cpus: int | None = None, cmdline: str = "",
                    e820: Sequence[tuple[int, int, int]] = ()) -> FwCfg:
        """The items a PC machine offers: RAM size, CPU counts, the command line, ``etc/e820``."""
        fw_cfg = cls()
        fw_cfg.add(FwCfgKey.RAM_SIZE, struct.pack("<Q", memory))
        fw_cfg.add(FwCfgKey.NB_CPUS, struct.pack("<H", cpus))
        fw_cfg.add(FwCfgKey.MAX_CPUS, struct.pack("<H", cpus if max_cpus is None else max_cpus))
        fw_cfg.add(FwCfgKey.NOGRAPHIC, struct.pack("<H", 1))
        encoded = cmdline.encode()
        if b"\0" in encoded:
            raise FwCfgError(f"cmdline={cmdline!r}: contains a NUL byte, which would end it early")
        fw_cfg.add(FwCfgKey.CMDLINE_SIZE, struct.pack("<I", len(encoded) + 1))
        fw_cfg.add(FwCfgKey.CMDLINE_DATA, encoded + b"\0")
        table = b"".join(struct.pack("<QQI", address, length, kind) for address, length, kind in e820)
        fw_cfg.add_file("etc/e820", table)
        fw_cfg.add(FwCfgKey.E820_TABLE, struct.pack("<I", len(e820)) + table)
        return fw_cfg

    # -- building ------------------------------------------------------------
    def add(self, key: int, data: bytes) -> None:
        """Offer ``data`` under fixed key ``key`` (below 0x20, or arch-local 0x8000 | n)."""
        if isinstance(key, bool) or not isinstance(key, int):
            raise FwCfgError(f"key={key!r}: expected an integer fw_cfg key, e.g. FwCfgKey.NB_CPUS")
        if not (0 <= key < FwCfgKey.FILE_FIRST or ARCH_LOCAL <= key <= ARCH_LOCAL | MAX_KEY):
            raise FwCfgError(f"key={key:#x}: fixed keys are 0x0-0x1f or arch-local 0x8000-0xbfff; keys "
                             f"0x20-0x3fff belong to files (use add_file)")
        if key == FwCfgKey.FILE_DIR:
            raise FwCfgError("key 0x19 is the file directory, which the model keeps itself")
        self._items[key] = self._checked_data(data, f"key {key:#x}")

    def add_file(self, name: str, data: bytes) -> int:
        """Offer ``data`` as file ``name`` (at most 55 bytes of ASCII); returns its key."""
        if not isinstance(name, str) or not name:
            raise FwCfgError(f"file name {name!r}: expected a non-empty string such as 'etc/e820'")
        try:
            encoded = name.encode("ascii")
        except UnicodeEncodeError:
            raise FwCfgError(f"file name {name!r}: fw_cfg file names are ASCII") from None
        if len(encoded) >= FILE_NAME_SIZE or b"\0" in encoded:
            raise FwCfgError(f"file name {name!r}: {len(encoded)} bytes; a name holds at most "
                             f"{FILE_NAME_SIZE - 1} bytes and no NUL")
        if any(existing == name for existing, _ in self._files):
            raise FwCfgError(f"file name {name!r}: already in the directory; each name appears once")
        key = FwCfgKey.FILE_FIRST + len(self._files)
        if key > MAX_KEY:
            raise FwCfgError(f"file {name!r}: the directory is full ({len(self._files)} files)")
        self._items[key] = self._checked_data(data, f"file {name!r}")
        self._files.append((name, key))
        self._update_directory()
        return key

    @staticmethod
    def _checked_data(data: bytes, what: str) -> bytes:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise FwCfgError(f"{what}: data must be bytes, got {type(data).__name__}")
        data = bytes(data)
        if len(data) > 0xFFFFFFFF:
            raise FwCfgError(f"{what}: {len(data)} bytes; a fw_cfg item holds at most 4 GiB - 1")
        return data

    def _update_directory(self) -> None:
        entries = [struct.pack(">IHH56s", len(self._items[key]), key, 0, name.encode())
                   for name, key in self._files]
        self._items[FwCfgKey.FILE_DIR] = struct.pack(">I", len(entries)) + b"".join(entries)

    def item(self, key: int) -> bytes:
        """The bytes under ``key`` (b"" if none)."""
        return self._items.get(key, b"")

    def file(self, name: str) -> bytes:
        for existing, key in self._files:
            if existing == name:
                return self._items[key]
        raise FwCfgError(f"no fw_cfg file {name!r}; files: {', '.join(n for n, _ in self._files) or 'none'}")

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self._files)

    # -- the guest's view ----------------------------------------------------
    def select(self, key: int) -> None:
        self._selected = key & ~WRITE_FLAG & 0xFFFF
        self._offset = 0

    def read_byte(self) -> int:
        """The next byte of the selected item; 0 past its end or for an unknown key (as QEMU)."""
        data = self._items.get(self._selected)
        if data is None or self._offset >= len(data):
            return 0
        value = data[self._offset]
        self._offset += 1
        return value

    # The bus interface (offsets from SELECTOR_PORT).
    def read(self, offset: int, size: int) -> int:
        if offset == 1:
            return int.from_bytes(bytes(self.read_byte() for _ in range(size)), "little")
        return self._selected & (1 << 8 * size) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self.select(value)
        # writes to the data port are ignored (QEMU >= 2.4 ignores them too)
