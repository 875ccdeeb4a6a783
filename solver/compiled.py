"""Compiled kernels (numba) for the solve's sequential inner loops, with the numpy code as fallback.

The vectorised numpy stages cost their dispatch overhead more than their arithmetic: a solve is
hundreds of small array ops (tens of microseconds each) on arrays of 10^2-10^4 numbers. The
kernels here run the same algorithms as scalar loops in one compiled call, so each costs
microseconds. Every kernel computes *exactly* what the numpy stage it replaces computes (same
floating-point operations in the same order, same tie rules), so a plan does not depend on
whether numba is installed; the unit tests compare both paths on the trace cases and random inputs.

Use: :data:`ENABLED` is true when numba imports, ``RAY_EPLB_NUMBA`` is not ``0`` and the warm-up
compiles; the stages call the kernels then, and their numpy code otherwise. The kernels live in
:mod:`~ray_eplb.solver.kernels_place` (refinement, dealing, maps) and
:mod:`~ray_eplb.solver.kernels_solve` (counts, the fused solve), compiled with ``cache=True``
(numba's on-disk cache: a fresh process loads them in a fraction of a second once any process
compiled them) and warmed up once on a tiny input the first time this module is imported, so no
solve pays the compile. They are single-threaded (no ``parallel=True``): a solve runs on one core.

numba's cache checks only the stamp of the file a kernel is defined in, so :func:`solve_kernel` (in
``kernels_solve.py``) could keep compiled code of the ``kernels_place.py`` kernels it calls after an
edit there; :func:`ray_eplb.solver.jit.drop_stale_cache` removes the solver's cache entries whenever
any solver source changed, so that cannot happen.
"""
from __future__ import annotations

import numpy as np

from ray_eplb.solver.jit import AVAILABLE
from ray_eplb.solver.kernels_place import (  # noqa: F401 (the kernels, called as compiled.<name>)
    _order_desc,
    _scan_rows,
    any_surplus,
    fill_maps_kernel,
    refine_kernel,
    rounds_kernel,
    slot_counts_kernel,
    snake_kernel,
)
from ray_eplb.solver.kernels_solve import _pairwise_sum, counts_kernel, solve_kernel  # noqa: F401

ENABLED = AVAILABLE


def warm_up() -> None:
    """Compile (or load from numba's cache) every kernel on a tiny input."""
    if not ENABLED:
        return
    io = np.array([[0, 1], [2, 3], [0, 2], [1, 3]], dtype=np.int64)
    il = np.array([[3.0, 1.0], [2.0, 0.5], [3.0, 2.0], [1.0, 0.5]])
    refine_kernel(io, il, np.ones_like(io), il.sum(1).reshape(1, 4), 4, 2, 2, np.zeros(1, dtype=np.int64), False)
    w = np.array([[0.9, 0.5, 0.25, 0.125]])
    snake_kernel(w, np.array([[3, 2, 2, 1]]), 4)
    rounds_kernel(w, 2)
    for dhondt in (False, True):
        solve_kernel(w, 8, 2, 1, 2, 1, dhondt)
    slot_counts_kernel(io.reshape(2, 4), 4)
    fill_maps_kernel(io.reshape(2, 4), np.full((2, 4, 5), -1, dtype=np.int64))
    any_surplus(io.reshape(1, 4, 2), np.ones((1, 4), dtype=np.int64))
    for dhondt in (False, True):
        counts_kernel(w, w.sum(1), 9, 1, dhondt)


try:
    warm_up()
except Exception as exc:  # noqa: BLE001 (a numba that cannot compile these must not break the solver)
    import warnings

    ENABLED = False
    warnings.warn(f"ray_eplb.solver: compiled kernels disabled, the numpy code runs ({type(exc).__name__}: {exc})",
                  RuntimeWarning, stacklevel=1)
