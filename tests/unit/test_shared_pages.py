"""Releasing object-store pages: only shared plasma mappings, never what is kept, data intact."""
import mmap
import os
import sys

import pytest
import torch

from ray_eplb.actors import shared_pages
from ray_eplb.actors.shared_pages import gaps, release_unused, store_mappings, store_resident_bytes, tensor_ranges

P = shared_pages._PAGE


def test_gaps_leave_out_kept_ranges():
    span = (0, 10 * P)
    assert gaps(span, []) == [(0, 10 * P)]
    assert gaps(span, [(2 * P, 4 * P), (6 * P, 7 * P)]) == [(0, 2 * P), (4 * P, 6 * P), (7 * P, 10 * P)]
    assert gaps(span, [(0, 10 * P)]) == []
    assert gaps(span, [(8 * P, 12 * P), (-P, P)]) == [(P, 8 * P)]


def test_tensor_ranges_cover_whole_pages():
    t = torch.ones(3 * P // 4 + 1, dtype=torch.float32)  # a little over three pages of bytes
    (a, b), = tensor_ranges([t])
    ptr = t.untyped_storage().data_ptr()
    assert a <= ptr and b >= ptr + t.numel() * 4
    assert a % P == 0 and b % P == 0


def test_store_mappings_reads_only_shared_plasma_lines(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text(
        "7f0000000000-7f0000100000 rw-s 00000000 00:1b 190    /dev/shm/plasmaDdfJF5 (deleted)\n"
        "7f0000100000-7f0000200000 rw-p 00000000 00:1b 191    /dev/shm/plasmaPrivate\n"
        "7f0000200000-7f0000300000 rw-s 00000000 00:1b 192    /dev/shm/other\n"
        "7f0000300000-7f0000400000 rw-p 00000000 00:00 0\n"
    )
    assert store_mappings(str(maps)) == [(0x7F0000000000, 0x7F0000100000)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise release is Linux only")
def test_release_keeps_data_and_drops_resident_pages(tmp_path, monkeypatch):
    """A shared file mapping standing in for the store: after release, RSS of the mapping drops,
    every byte reads back the same, and the kept tensor's pages stay resident."""
    path = tmp_path / "plasmaTest"
    n = 64 * P
    path.write_bytes(os.urandom(n))
    with open(path, "r+b") as f:
        mm = mmap.mmap(f.fileno(), n, flags=mmap.MAP_SHARED)
    whole = torch.frombuffer(mm, dtype=torch.uint8)  # [n] view of the shared mapping
    before = whole.clone()
    kept = whole[8 * P:12 * P]
    base = whole.untyped_storage().data_ptr()
    monkeypatch.setattr(shared_pages, "store_mappings", lambda: [(base, base + n)])

    def resident_pages() -> int:
        with open("/proc/self/smaps") as f:
            lines = f.read().split("\n")
        for i, line in enumerate(lines):
            if line.startswith(f"{base:x}-"):
                rss = next(x for x in lines[i + 1:] if x.startswith("Rss:"))
                return int(rss.split()[1]) * 1024 // P
        raise AssertionError("mapping not found in smaps")

    assert resident_pages() == 64
    resident_before = store_resident_bytes()  # the mapping's name holds "plasma", as the store's does
    assert resident_before >= 64 * P
    kept_view = torch.frombuffer(mm, dtype=torch.uint8, offset=8 * P, count=4 * P)
    advised = release_unused([kept_view])
    assert advised == 60 * P
    assert resident_pages() == 4  # only the kept tensor's pages
    assert resident_before - store_resident_bytes() == 60 * P
    assert torch.equal(whole, before)  # reading faults the same bytes back
    assert torch.equal(kept, before[8 * P:12 * P])
    del whole, kept, kept_view
