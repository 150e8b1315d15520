"""Identity page tables: long mode needs paging, and most tests want virtual == physical.

Why this exists: the long-mode helper maps guest-physical 0..4 GiB (the xAPIC
and IOAPIC pages included) with 2 MiB pages, so a guest can use any address
below 4 GiB as is. Layout from the Intel SDM Vol. 3A "4-Level Paging".
"""

from __future__ import annotations

import struct

PTE_PRESENT = 1 << 0
PTE_WRITABLE = 1 << 1
PTE_LARGE = 1 << 7
PAGE_SIZE = 4096
LARGE_PAGE_SIZE = 2 << 20
IDENTITY_MAP_GIB = 4


def identity_page_tables(pml4: int) -> dict[int, bytes]:
    """PML4 at ``pml4``, then a PDPT and 4 page directories (6 pages in all) mapping 0..4 GiB."""
    pdpt, pd = pml4 + PAGE_SIZE, pml4 + 2 * PAGE_SIZE
    tables = {pml4: struct.pack("<Q", pdpt | PTE_PRESENT | PTE_WRITABLE).ljust(PAGE_SIZE, b"\0")}
    directories = [pd + i * PAGE_SIZE | PTE_PRESENT | PTE_WRITABLE for i in range(IDENTITY_MAP_GIB)]
    tables[pdpt] = struct.pack(f"<{len(directories)}Q", *directories).ljust(PAGE_SIZE, b"\0")
    for gib in range(IDENTITY_MAP_GIB):
        entries = [((gib * 512 + i) * LARGE_PAGE_SIZE) | PTE_PRESENT | PTE_WRITABLE | PTE_LARGE
                   for i in range(512)]
        tables[pd + gib * PAGE_SIZE] = struct.pack("<512Q", *entries)
    return tables
