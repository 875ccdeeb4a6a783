"""Give back the object-store pages a process no longer uses, so its RSS stays flat.

Ray's object store is one shared-memory file (``/dev/shm/plasma...``, plus fallback files when it
is full) that every worker process maps whole. Each page a process touches there (an expert it
received, a reply it wrote for a peer) counts in its RSS until it is unmapped, even after the
object is freed, so a worker that swaps for hours sees its RSS climb towards the store's size
while its private memory stays flat.

``madvise(MADV_DONTNEED)`` on a *shared* mapping only removes this process's page-table entries:
the data stays in the shared file, and a later read faults the same bytes back in. So releasing
pages can never change what a tensor reads; it costs a minor page fault per page read again. We
keep the ranges of tensors still in use (the served and staged weight tables) mapped, so serving
never pays those faults. Linux only; elsewhere nothing is released.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Iterable

import torch

_MADV_DONTNEED = 4  # Linux
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_libc = None


def _madvise():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc.madvise.restype = ctypes.c_int
    return _libc.madvise


def _is_store(parts: list[str]) -> bool:
    """Whether a ``/proc/self/maps`` (or ``smaps`` header) line, split in 6, is a shared mapping of
    Ray's object store."""
    return len(parts) == 6 and parts[1][3] == "s" and "plasma" in os.path.basename(parts[5].strip())


def store_mappings(maps_path: str = "/proc/self/maps") -> list[tuple[int, int]]:
    """``(start, end)`` addresses of this process's shared mappings of Ray's object store."""
    out = []
    try:
        with open(maps_path) as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if _is_store(parts):
                    start, end = (int(a, 16) for a in parts[0].split("-"))
                    out.append((start, end))
    except OSError:
        return []
    return out


def tensor_ranges(tensors: Iterable[torch.Tensor]) -> list[tuple[int, int]]:
    """``(start, end)`` byte ranges of the storage behind each CPU tensor, widened to whole pages."""
    out = []
    for t in tensors:
        if t.device.type != "cpu":
            continue
        st = t.untyped_storage()
        start, n = st.data_ptr(), st.nbytes()
        if n:
            out.append((start - start % _PAGE, -(-(start + n) // _PAGE) * _PAGE))
    return out


def gaps(span: tuple[int, int], keep: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of ``span`` not covered by any range in ``keep`` (page-aligned ranges)."""
    lo, hi = span
    out = []
    for a, b in sorted(keep):
        if b <= lo or a >= hi:
            continue
        if a > lo:
            out.append((lo, a))
        lo = max(lo, b)
    if lo < hi:
        out.append((lo, hi))
    return out


def release_unused(in_use: Iterable[torch.Tensor]) -> int:
    """Unmap every object-store page of this process except those behind ``in_use``; returns the
    bytes of address space advised (not all of it was resident). No-op off Linux."""
    if not sys.platform.startswith("linux"):
        return 0
    spans = store_mappings()
    if not spans:
        return 0
    keep = tensor_ranges(in_use)
    madvise, advised = _madvise(), 0
    for span in spans:
        for a, b in gaps(span, keep):
            if madvise(a, b - a, _MADV_DONTNEED) == 0:
                advised += b - a
    return advised


def store_resident_bytes(smaps_path: str = "/proc/self/smaps") -> int:
    """Bytes of Ray's object store resident in this process's page tables (what RSS counts of it)."""
    total, inside = 0, False
    try:
        with open(smaps_path) as f:
            for line in f:
                head = line.split(maxsplit=1)[0]
                if "-" in head and not head.endswith(":"):  # a mapping's header line
                    inside = _is_store(line.split(maxsplit=5))
                elif inside and head == "Rss:":
                    total += int(line.split()[1]) * 1024
    except OSError:
        return 0
    return total
