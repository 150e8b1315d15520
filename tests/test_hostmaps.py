"""pykvm.runtime.hostmaps: this process's mappings, their resident size, and madvise on one."""

from __future__ import annotations

import mmap

import pytest

from pykvm.runtime import hostmaps

SMAPS = """\
7f0000000000-7f0000001000 rw-s 00000000 00:01 2050                       /dev/zero (deleted)
Size:                  4 kB
Rss:                   4 kB
VmFlags: rd wr sh mr mw me ms sd
7f0000002000-7f0000005000 rw-p 00000000 00:00 0
Size:                 12 kB
Rss:                   8 kB
"""


def test_maps_lines_and_smaps_rss_parse():
    page = hostmaps.parse_maps_line(SMAPS.splitlines()[0])
    assert (page.start, page.size, page.perms, page.inode) == (0x7F0000000000, 4096, "rw-s", 2050)
    assert page.shared_anonymous and page.path == "/dev/zero (deleted)"
    private = hostmaps.parse_maps_line("7f0000002000-7f0000005000 rw-p 00000000 00:00 0")
    assert private.path == "" and not private.shared and not private.shared_anonymous
    assert hostmaps.parse_smaps_rss(SMAPS, 0x7F0000000000) == 4
    assert hostmaps.parse_smaps_rss(SMAPS, 0x7F0000002000) == 8
    assert hostmaps.parse_smaps_rss(SMAPS, 0x1000) is None
    assert hostmaps.new_mappings([private], [page, private]) == [page]
    with pytest.raises(hostmaps.HostMapsError, match="not a /proc/<pid>/maps line"):
        hostmaps.parse_maps_line("garbage")


def test_dontneed_drops_a_shared_page_from_the_page_table_and_keeps_its_contents():
    before = hostmaps.read_maps()
    with mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_SHARED) as memory:
        [page] = [m for m in hostmaps.new_mappings(before, hostmaps.read_maps()) if m.shared_anonymous]
        assert hostmaps.resident_kb(page) == 0            # nothing touched yet
        memory[0] = 0x5A
        assert hostmaps.resident_kb(page) == mmap.PAGESIZE // 1024
        hostmaps.madvise_dontneed(page)
        assert hostmaps.resident_kb(page) == 0
        assert memory[0] == 0x5A                          # shmem kept the page; the read mapped it again
        assert hostmaps.resident_kb(page) == mmap.PAGESIZE // 1024
    with pytest.raises(hostmaps.HostMapsError, match="no mapping at"):
        hostmaps.resident_kb(page)


def test_madvise_refuses_what_it_cannot_advise():
    with pytest.raises(hostmaps.HostMapsError, match="pass a Mapping"):
        hostmaps.madvise_dontneed(0x1000)                # an address: which mapping is not known
    private = next(m for m in hostmaps.read_maps() if not m.shared)
    with pytest.raises(hostmaps.HostMapsError, match="is private"):
        hostmaps.madvise_dontneed(private)               # Python's own memory: never zeroed
    before = hostmaps.read_maps()
    with mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_SHARED):
        [page] = [m for m in hostmaps.new_mappings(before, hostmaps.read_maps()) if m.shared_anonymous]
    with pytest.raises(hostmaps.HostMapsError, match="no longer in"):
        hostmaps.madvise_dontneed(page)                  # unmapped since it was read
