"""numba's ``njit`` where it is installed (``None`` otherwise, or when ``RAY_EPLB_NUMBA=0``).

The migration-aware planner's kernels (relocations, goal swaps, duplicate repair, the kept-slots
bound) are compiled with it, ``cache=True`` (numba's on-disk cache) and single-threaded; without
it, each stage runs its numpy code.
"""
from __future__ import annotations

import os

try:
    if os.environ.get("RAY_EPLB_NUMBA", "1") == "0":
        raise ImportError("disabled by RAY_EPLB_NUMBA=0")
    from numba import njit
except ImportError:
    njit = None
