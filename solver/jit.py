"""The numba switch for :mod:`ray_eplb.solver.compiled`: ``njit`` when numba imports and
``RAY_EPLB_NUMBA`` is not ``0``, else ``None`` (the kernels then stay plain Python functions,
never called: the numpy stages run)."""
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
    """``numba.njit(cache=True, nogil=True)`` where numba is available."""
    return njit(cache=True, nogil=True)(fn) if AVAILABLE else fn
