"""This process's own memory mappings: ``/proc/self/maps`` and ``smaps`` read back, and ``madvise`` on one.

Why this exists: KVM puts some of its per-VM memory into the VMM's address
space. Its private memslots (the APIC-access page of kvm_intel with
flexpriority, for one) are backed by ``vm_mmap(MAP_SHARED | MAP_ANONYMOUS)``
mappings made in the process that creates the vCPU, so they show in
``/proc/self/maps`` as ``/dev/zero (deleted)`` and can be found by comparing
the maps before and after (:func:`new_mappings`). ``smaps`` says how much of
each is resident (:func:`resident_kb`), and :func:`madvise_dontneed` drops its
pages from the page table, which runs the MMU notifiers KVM registered on
this process::

    before = hostmaps.read_maps()
    vcpu = vm.create_vcpu()
    page = [m for m in hostmaps.new_mappings(before, hostmaps.read_maps()) if m.shared_anonymous][0]
    hostmaps.madvise_dontneed(page)
    assert hostmaps.resident_kb(page) == 0
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import os
from collections.abc import Iterable

from ..core.errors import PyKvmError

PROC_MAPS = "/proc/self/maps"
PROC_SMAPS = "/proc/self/smaps"
MADV_DONTNEED = 4                       # <sys/mman.h>
SHARED_ANONYMOUS_NAME = "/dev/zero (deleted)"   # how the kernel names a MAP_SHARED | MAP_ANONYMOUS mapping


class HostMapsError(PyKvmError):
    """A mapping of this process could not be read or advised; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class Mapping:
    """One line of ``/proc/self/maps``."""

    start: int
    end: int
    perms: str          # e.g. "rw-s": read, write, execute, s(hared) or p(rivate)
    offset: int
    inode: int
    path: str           # "" for private anonymous memory

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def shared(self) -> bool:
        return self.perms.endswith("s")

    @property
    def shared_anonymous(self) -> bool:
        """Made with ``MAP_SHARED | MAP_ANONYMOUS`` (shmem that no file names): KVM's private memslots."""
        return self.shared and self.path == SHARED_ANONYMOUS_NAME

    def describe(self) -> str:
        return f"{self.start:#x}-{self.end:#x} {self.perms} {self.size // 1024} KiB {self.path or '[anonymous]'}"


def parse_maps_line(line: str) -> Mapping:
    """One ``/proc/<pid>/maps`` line: ``start-end perms offset dev inode [path]``."""
    fields = line.split(maxsplit=5)
    if len(fields) < 5 or "-" not in fields[0]:
        raise HostMapsError(f"not a /proc/<pid>/maps line: {line!r}")
    start, end = (int(part, 16) for part in fields[0].split("-"))
    path = fields[5].strip() if len(fields) > 5 else ""
    return Mapping(start, end, fields[1], int(fields[2], 16), int(fields[4]), path)


def read_maps(path: str = PROC_MAPS) -> list[Mapping]:
    """The mappings of this process now, in address order."""
    try:
        with open(path) as maps:
            return [parse_maps_line(line) for line in maps if line.strip()]
    except OSError as exc:
        raise HostMapsError(f"cannot read {path}: {exc.strerror}; /proc must be mounted") from exc


def new_mappings(before: Iterable[Mapping], after: Iterable[Mapping]) -> list[Mapping]:
    """The mappings of ``after`` that ``before`` had not (same range, permissions and path)."""
    old = {(m.start, m.end, m.perms, m.path) for m in before}
    return [m for m in after if (m.start, m.end, m.perms, m.path) not in old]


def parse_smaps_rss(text: str, start: int) -> int | None:
    """The ``Rss:`` in kB of the mapping of an ``smaps`` text that begins at ``start``; None if it has none."""
    inside = False
    for line in text.splitlines():
        head = line.split(maxsplit=1)[0] if line.strip() else ""
        if "-" in head and not head.endswith(":"):          # a mapping's header line
            inside = int(head.split("-")[0], 16) == start
        elif inside and head == "Rss:":
            return int(line.split()[1])
    return None


def resident_kb(mapping: Mapping, path: str = PROC_SMAPS) -> int:
    """How much of ``mapping`` is in this process's page table now (smaps ``Rss``, kB)."""
    try:
        with open(path) as smaps:
            text = smaps.read()
    except OSError as exc:
        raise HostMapsError(f"cannot read {path}: {exc.strerror}; /proc must be mounted") from exc
    rss = parse_smaps_rss(text, mapping.start)
    if rss is None:
        raise HostMapsError(f"{path} has no mapping at {mapping.start:#x} any more ({mapping.describe()}): "
                            "it was unmapped; look it up again after whatever replaced it")
    return rss


def madvise_dontneed(mapping: Mapping) -> None:
    """``madvise(MADV_DONTNEED)`` on the whole of ``mapping``, a shared mapping of this process.

    Drops its pages from this process's page table (a shared mapping keeps the
    pages themselves; the next access maps them again) and runs the MMU
    notifiers registered on the process first, KVM's among them. Only a shared
    mapping that is still mapped as read is accepted: on private memory
    MADV_DONTNEED would zero what Python or a library keeps there.
    """
    if not isinstance(mapping, Mapping):
        raise HostMapsError(f"mapping={mapping!r}: pass a Mapping from hostmaps.read_maps() or new_mappings()")
    if not mapping.shared:
        raise HostMapsError(f"mapping {mapping.describe()} is private: MADV_DONTNEED would zero its contents "
                            "under whatever uses it; only shared mappings (perms ending in 's') are advised")
    current = {(m.start, m.end, m.perms, m.path) for m in read_maps()}
    if (mapping.start, mapping.end, mapping.perms, mapping.path) not in current:
        raise HostMapsError(f"mapping {mapping.describe()} is no longer in {PROC_MAPS}: it was unmapped or "
                            "changed; read the maps again")
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    if libc.madvise(ctypes.c_void_p(mapping.start), ctypes.c_size_t(mapping.size), MADV_DONTNEED) != 0:
        err = ctypes.get_errno()
        raise HostMapsError(f"madvise({mapping.start:#x}, {mapping.size}, MADV_DONTNEED) failed: "
                            f"{os.strerror(err)}; the mapping must not be locked (munlock it first)")
