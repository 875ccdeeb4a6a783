"""Replica counts: how many slots each logical expert gets.

The default, ``hybrid_tail``, is the hybrid-tail waterfill (a water-filling replica rule with a
peak-aware D'Hondt / Sainte-Lague tail, from the project's design notes), computed for all rows
at once:

1. *Water level.* The design bisects a threshold ``t`` until ``sum_i max(ceil(w_i / t), 1)`` fits
   ``num_phy``. The level it converges to is ``t*`` = the ``(m+1)``-th largest of all quotients
   ``w_i / k`` (``k >= 1``, ``m = num_phy - n`` extra seats), because ``max(ceil(w/t), 1) = 1 + #{k :
   w/k > t}``. We find ``t*`` directly: the bracket ``[S / num_phy, S / m]`` (``S`` the row sum)
   holds it, a few bisection steps shrink it until it holds at most 32 quotients, and those are
   ranked (interpolation steps measured slower on the traces). The
   counts at ``t*`` give every row the minimal possible peak ``max_i w_i / c_i``; on a row without
   ties they already use every seat.
2. *Bulk fill.* Seats left over (rows with ties at ``t*``) beyond the last ``T`` go in chunks of up
   to ``n`` to the largest ``w / c``.
3. *Hybrid tail.* The last ``T = max(1, round(0.1 * m))`` seats (capped by what remains) go one at a
   time to the D'Hondt pick ``argmax w/(c+1)`` or the Sainte-Lague pick ``argmax w/(2c+1)``,
   whichever predicts the lower new peak; ties go to the lower runner-up peak, then to the heavier
   expert.

``dhondt`` fills the leftover seats by plain ``argmax w / c`` (sequential D'Hondt: the exact
min-max greedy).

The public function takes and returns torch tensors; the work is done in numpy float64 on the CPU.
These problems are tiny (``X * n`` ~ 10^3-10^4 numbers) and sequential in nature, so every
array op costs its dispatch overhead rather than its arithmetic: measured on a 2-core x86-64 CPU, numpy's dispatch
is 1.5-2x cheaper than torch's for elementwise ops and 5-20x cheaper for sorts of this size.
Where numba is installed, the level search and the fills run as one compiled kernel per call
(:func:`ray_eplb.solver.compiled.counts_kernel`: the same float operations, the same counts).
"""
from __future__ import annotations

import numpy as np
import torch

from ray_eplb.solver import compiled

METHODS = ("hybrid_tail", "dhondt")
_MAX_BRACKET_STEPS = 64
_BRACKET_SEATS = 32  # rank the quotients once every bracket holds at most this many (measured best)


def check_weight(weight: torch.Tensor, name: str = "weight") -> np.ndarray:
    """Validate a load tensor and return it as a ``[X, n]`` float64 numpy array on the CPU.

    Raises ``ValueError`` naming the bad value unless ``weight`` is a 2-D real tensor of finite,
    non-negative loads. (Checked in numpy after one conversion: torch's small-op overhead here
    was a tenth of a solve.)
    """
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, experts], got shape {tuple(weight.shape)}")
    if weight.dtype == torch.bool or weight.is_complex():
        raise ValueError(f"{name} must hold real loads, got dtype {weight.dtype}")
    t = weight.detach().cpu()
    if t.dtype in (torch.float64, torch.float32, torch.float16, torch.int64, torch.int32, torch.int16, torch.int8,
                   torch.uint8):
        w = t.numpy().astype(np.float64)  # numpy's cast: one thread (torch's may use several)
    else:  # bfloat16 and other dtypes numpy lacks
        w = t.to(torch.float64).numpy()
    if not np.isfinite(w).all():
        r, c = np.argwhere(~np.isfinite(w))[0]
        raise ValueError(f"{name}[{r}, {c}] = {w[r, c]} is not finite")
    if (w < 0).any():
        r, c = np.argwhere(w < 0)[0]
        raise ValueError(f"{name}[{r}, {c}] = {w[r, c]} is negative")
    return w


def replica_counts(weight: torch.Tensor, num_phy: int, method: str = "hybrid_tail") -> torch.Tensor:
    """Split ``num_phy`` slots among the experts of every row.

    Args:
        weight: ``[X, n]`` non-negative loads (any real dtype, any device).
        num_phy: slots per row; ``num_phy >= n``.
        method: ``"hybrid_tail"`` (default) or ``"dhondt"``.

    Returns:
        ``[X, n]`` int64 on ``weight``'s device: every count >= 1, each row sums to ``num_phy``,
        and ``max_i w_i / c_i`` is the minimum possible on every row.
    """
    w = check_weight(weight)
    check_num_phy(num_phy, weight.shape[1])
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}")
    return torch.from_numpy(counts_np(w, num_phy, method)).to(weight.device)


def check_num_phy(num_phy: int, n: int) -> None:
    if isinstance(num_phy, bool) or not isinstance(num_phy, int) or num_phy < n or n == 0:
        raise ValueError(f"num_phy={num_phy!r} must be an int >= the number of experts n={n} (n >= 1)")


def counts_np(w: np.ndarray, num_phy: int, method: str = "hybrid_tail") -> np.ndarray:
    """:func:`replica_counts` on a checked ``[X, n]`` float64 array; returns ``[X, n]`` int64."""
    num_rows, n = w.shape
    if num_phy == n or num_rows == 0:
        return np.ones((num_rows, n), dtype=np.int64)
    if n == 1:
        return np.full((num_rows, 1), num_phy, dtype=np.int64)
    m = num_phy - n
    zero_row = w.sum(1) == 0  # [X]
    if zero_row.any():
        w = np.where(zero_row[:, None], 1.0, w)  # stand-in so the level search is defined
    # Scale every row by a power of two so its max lies in [0.5, 1): exact, so every quotient
    # comparison and tie is unchanged, and neither subnormal nor huge loads under/overflow.
    w = np.ldexp(w, -np.frexp(w.max(1))[1][:, None])
    tail = max(1, int(round(0.1 * m)))
    if compiled.ENABLED:  # the same computation, compiled (identical counts)
        counts = compiled.counts_kernel(w, w.sum(1), num_phy, tail, method == "dhondt")
    elif method == "dhondt":
        counts = _fill_dhondt(w, _level_counts(w, num_phy, m), num_phy)
    else:
        counts = _fill_hybrid_tail(w, _level_counts(w, num_phy, m), num_phy, tail=tail)
    if zero_row.any():  # the design's all-zero rule: everyone num_phy // n, the first num_phy % n one more
        base = np.full(n, num_phy // n, dtype=np.int64)
        base[: num_phy % n] += 1
        counts[zero_row] = base
    return counts


def _seats(w: np.ndarray, level: np.ndarray) -> np.ndarray:
    """``[X, n]`` seats each expert needs so no replica carries more than ``level [X]``.

    Float64 holding whole numbers (exact far beyond any slot count): skips an int conversion.
    """
    seats = np.ceil(w / level[:, None])
    return np.maximum(seats, 1.0, out=seats)


def _level_counts(w: np.ndarray, num_phy: int, m: int) -> np.ndarray:
    """Counts at the water level ``t*`` (the ``(m+1)``-th largest quotient) of every row.

    ``w``: ``[X, n]`` float64 with positive row sums. Returns ``[X, n]`` int64 summing to at most
    ``num_phy`` per row (less only where quotients tie at ``t*``).
    """
    num_rows, n = w.shape
    total = w.sum(1)  # [X]
    # Bracket: seats(lo) >= num_phy >= seats(hi), since sum max(ceil(w/t),1) lies in [S/t, S/t + n].
    lo, hi = total / num_phy, total / m  # [X]
    s_lo, s_hi = _seats(w, lo).sum(1), _seats(w, hi).sum(1)  # [X]
    for _ in range(_MAX_BRACKET_STEPS):
        # Bisect until every bracket holds few quotients; a row whose end sits exactly on num_phy
        # is settled (bisecting it further changes nothing we use).
        gap = np.where((s_lo == num_phy) | (s_hi == num_phy), 0, s_lo - s_hi)  # [X]
        if gap.max() <= _BRACKET_SEATS:
            break
        t = 0.5 * (lo + hi)
        s_t = _seats(w, t).sum(1)
        fits = s_t <= num_phy  # [X]: t becomes hi, else lo
        hi, s_hi = np.where(fits, t, hi), np.where(fits, s_t, s_hi)
        lo, s_lo = np.where(fits, lo, t), np.where(fits, s_lo, s_t)
    c_lo, c_hi = _seats(w, lo).astype(np.int64), _seats(w, hi).astype(np.int64)  # [X, n]
    # A row whose lo fits sits on t* = lo; one whose hi uses every seat keeps hi's counts.
    on_lo = s_lo == num_phy
    c_hi = np.where(on_lo[:, None], c_lo, c_hi)
    need = np.where(on_lo, 0, num_phy - s_hi).astype(np.int64)  # [X] seats t* adds on top of seats(hi)
    if need.max() == 0:
        return c_hi
    # The quotients in (lo, hi] are w_i / k for k in [c_hi_i, c_lo_i): at most a few per row.
    # List them flat, rank them within their row, and take the (need+1)-th largest as t*.
    d = np.where((need > 0)[:, None], c_lo - c_hi, 0).ravel()  # [X*n]
    owner = np.repeat(np.arange(num_rows * n), d)  # [D] flat expert of each quotient
    k = c_hi.ravel()[owner] + np.arange(owner.size) - np.repeat(np.cumsum(d) - d, d)  # [D]
    q = w.ravel()[owner] / k  # [D]
    row = owner // n  # [D]
    order = np.lexsort((-q, row))  # by row, then quotient descending
    per_row = np.bincount(row, minlength=num_rows)  # [X]
    pos = np.minimum(np.cumsum(per_row) - per_row + need, owner.size - 1)  # [X]
    level = q[order[pos]]  # [X] t* (used where need > 0)
    above = q > level[row]  # [D]
    return c_hi + np.bincount(owner, weights=above, minlength=num_rows * n).astype(np.int64).reshape(num_rows, n)


def _fill_dhondt(w: np.ndarray, counts: np.ndarray, num_phy: int) -> np.ndarray:
    """Give the seats still free one at a time to ``argmax w / c``. Shapes ``[X, n]``."""
    free = num_phy - counts.sum(1)  # [X]
    rows = np.arange(w.shape[0])
    for _ in range(int(free.max())):
        pick = np.argmax(w / counts, axis=1)  # [X]
        counts[rows, pick] += free > 0
        free = free - (free > 0)
    return counts


def _fill_hybrid_tail(w: np.ndarray, counts: np.ndarray, num_phy: int, tail: int) -> np.ndarray:
    """The design's bulk fill and hybrid D'Hondt / Sainte-Lague tail. Shapes ``[X, n]``."""
    num_rows, n = w.shape
    free = num_phy - counts.sum(1)  # [X]
    if free.max() == 0:
        return counts
    last = np.minimum(free, tail)  # [X] seats placed one at a time
    bulk = free - last  # [X] seats placed in chunks of up to n
    rows = np.arange(num_rows)
    cols = np.arange(n)
    while bulk.max() > 0:
        chunk = np.minimum(bulk, n)  # [X]
        order = np.argsort(-(w / counts), axis=1, kind="stable")  # [X, n] largest w/c first
        counts[rows[:, None], order] += cols < chunk[:, None]
        bulk = bulk - chunk
    # The tail: one seat per step, on the rows that still have seats (usually a few rows with ties).
    act = np.nonzero(last)[0]  # [A]
    w_a, c_a, left = w[act], counts[act], last[act]
    sub = np.arange(act.size)
    for _ in range(int(left.max(initial=0))):
        avg = w_a / c_a  # [A, n]
        top = avg.argmax(1)  # [A] current peak and, below, the runner-up value
        top_val = avg[sub, top]
        avg[sub, top] = -np.inf
        second = avg.max(1)
        picks = np.stack([np.argmax(w_a / (c_a + 1), 1), np.argmax(w_a / (2 * c_a + 1), 1)], 1)  # [A, 2]
        heavy = w_a[sub[:, None], picks]  # [A, 2] D'Hondt pick, Sainte-Lague pick
        new_avg = heavy / (c_a[sub[:, None], picks] + 1)
        others = np.where(picks == top[:, None], second[:, None], top_val[:, None])  # [A, 2] peak elsewhere
        peak = np.maximum(others, new_avg)
        use_sl = (peak[:, 1] < peak[:, 0]) | (
            (peak[:, 1] == peak[:, 0])
            & ((others[:, 1] < others[:, 0]) | ((others[:, 1] == others[:, 0]) & (heavy[:, 1] > heavy[:, 0])))
        )
        c_a[sub, np.where(use_sl, picks[:, 1], picks[:, 0])] += left > 0
        left = left - 1
    counts[act] = c_a
    return counts
