"""The numba switch: ``njit`` when numba imports and ``RAY_EPLB_NUMBA`` is not ``0``, else ``None``.

Both the fresh solve's kernels (:mod:`ray_eplb.solver.compiled`) and the migration-aware
planner's (relocations, goal swaps, duplicate repair, the kept-slots bound) are compiled through
it, with ``cache=True`` (numba's on-disk cache), single-threaded. Without numba the kernels stay
plain Python functions that are never called: each stage runs its numpy code.
"""
from __future__ import annotations

import os

try:
    if os.environ.get("RAY_EPLB_NUMBA", "1") == "0":
        raise ImportError("disabled by RAY_EPLB_NUMBA=0")
    from numba import njit
except ImportError:
    njit = None

AVAILABLE = njit is not None


def jit(fn):
    """``numba.njit(cache=True, nogil=True)`` where numba is available, ``fn`` itself otherwise."""
    return njit(cache=True, nogil=True)(fn) if AVAILABLE else fn
