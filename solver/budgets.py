"""Move budgets of the migration-aware planner: per layer, or one total spent where it gains most.

:func:`budget_per_layer` turns ``max_moves`` into per-layer budgets (and a total);
:func:`hull_spend` spends a total over the layers along each layer's upper concave hull of
(moves, gain) plans, best gain per moved slot first. Used by
:func:`~ray_eplb.solver.migration.migrate`.
"""
from __future__ import annotations

import math

import numpy as np


def budget_per_layer(max_moves, num_layers: int, num_replicas: int, scope: str) -> tuple[np.ndarray, int | None]:
    """Turn ``max_moves`` into per-layer budgets ``[L]`` and, for ``scope="total"``, a total.

    ``max_moves``: ``None`` (no limit), an int (slots), or a float in ``(0, 1]`` (fraction of the
    slots of a layer, or of all layers for ``scope="total"``).
    """
    if scope not in ("layer", "total"):
        raise ValueError(f"budget_scope={scope!r} must be 'layer' or 'total'")
    unlimited = np.full(num_layers, num_replicas, dtype=np.int64)
    if max_moves is None:
        return unlimited, None
    if isinstance(max_moves, bool) or not isinstance(max_moves, (int, float, np.integer, np.floating)):
        raise ValueError(f"max_moves={max_moves!r} must be None, an int >= 0 or a fraction in (0, 1]")
    if isinstance(max_moves, (float, np.floating)):
        if not 0 < max_moves <= 1:
            raise ValueError(f"max_moves={max_moves!r}: a float budget is a fraction in (0, 1]")
        per = math.ceil(max_moves * num_replicas - 1e-9)  # a positive fraction allows >= 1 move
        total = math.ceil(max_moves * num_replicas * num_layers - 1e-9)
    else:
        if max_moves < 0:
            raise ValueError(f"max_moves={max_moves!r} must be >= 0")
        per = total = int(max_moves)
    if scope == "total":
        return unlimited, total
    return np.full(num_layers, per, dtype=np.int64), None


def hull_spend(gains: np.ndarray, moved: np.ndarray, total: int) -> np.ndarray:
    """Which of ``K`` plans each layer takes: summed ``moved`` at most ``total``, summed gain high.

    ``gains``, ``moved``: ``[K, L]``, plan 0 of every layer is "nothing" (0 moves, 0 gain). Per
    layer, the plans on the upper concave hull of (moves, gain) form a chain of steps with falling
    gain per extra moved slot; the steps of all layers are taken best rate first, each only after
    its layer's previous step and while the total allows it. Returns ``[L]`` int64 plan indices.
    """
    num_layers = gains.shape[1]
    steps = []  # (rate, layer, from plan, to plan, extra moves)
    for layer in range(num_layers):
        g, m = gains[:, layer], moved[:, layer]
        hull = [0]
        for k in np.lexsort((-g, m)):  # fewest moves first, the higher gain first among equals
            if m[k] <= m[hull[-1]] or g[k] <= g[hull[-1]]:
                continue  # no more gain, or no more moves, than the hull so far
            while len(hull) > 1 and ((g[hull[-1]] - g[hull[-2]]) * (m[k] - m[hull[-2]])
                                     <= (g[k] - g[hull[-2]]) * (m[hull[-1]] - m[hull[-2]])):
                hull.pop()  # the last point is not above the chord to this one
            hull.append(int(k))
        steps += [((g[b] - g[a]) / (m[b] - m[a]), layer, a, b, int(m[b] - m[a])) for a, b in zip(hull, hull[1:])]
    at = np.zeros(num_layers, dtype=np.int64)
    left = total
    for _, layer, a, b, extra in sorted(steps, key=lambda s: -s[0]):  # stable: ties keep layer order
        if at[layer] == a and extra <= left:
            at[layer], left = b, left - extra
    return at
