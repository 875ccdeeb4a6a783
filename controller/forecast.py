"""Forecast of the next window's expert load from the windows seen so far (pure, no Ray).

A placement is judged on the load that comes *after* it was planned, so the controller plans on a
forecast rather than on the last window alone. Three kinds:

* ``last``: the last window (what every published EPLB solver plans on).
* ``ema``: exponential moving average, ``f = alpha * load + (1 - alpha) * f`` (the first window
  starts it); a small ``alpha`` remembers longer.
* ``window``: the mean (``reduce="mean"``) or sum (``reduce="sum"``) of the last ``window``
  windows. The solver's plan depends only on each layer's load *shape*, so mean and sum give
  equally balanced placements (float rounding may pick a different one among ties); the sum keeps
  token counts, the mean keeps the scale of one window.

Loads are raw token counts per window, so a busy window weighs more than a quiet one in ``ema``
and ``window`` (as it should: it carries more routing evidence). An all-zero window is an ordinary
update (it only scales the forecast of ``ema``/``window``, which no placement notices).

    f = Forecaster("ema", alpha=0.5)
    f.update(load)        # load [L, E], once per window
    plan_on = f.predict() # [L, E] float64 torch tensor

Specs for command lines: ``"last"``, ``"ema:0.5"``, ``"window:4"`` (:meth:`Forecaster.from_spec`).
"""
from __future__ import annotations

from collections import deque

import numpy as np
import torch

KINDS = ("last", "ema", "window")
REDUCES = ("mean", "sum")
# Chosen by measurement (``ray-eplb bench --migration``, forecast sweep): the best mean next-window
# balancedness over the traces with a real time axis and >= 10 windows (dsv2lite x2, llama4 x2), both
# from scratch (0.7342 vs last 0.7187, window:2 0.7324, ema:0.7 0.7333, ema:0.3 0.7293) and with a 25%
# move budget (0.7352 vs last 0.7216). Slow drift (dsv2lite) prefers longer memory (ema:0.2-0.3,
# window:8), abrupt drift (llama4) shorter (ema:0.5-0.7); 0.5 is the best compromise.
DEFAULT_SPEC = "ema:0.5"


def _as_load(load, name: str = "load") -> torch.Tensor:
    """Validate one window ``[L, E]`` (torch or numpy, any real dtype) -> float64 CPU tensor."""
    try:
        t = load if isinstance(load, torch.Tensor) else torch.as_tensor(np.asarray(load))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{name} is not a numeric [L, E] array ({exc})") from None
    if t.dim() != 2:
        raise ValueError(f"{name} must be [L, E], got shape {tuple(t.shape)}")
    if t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be real-valued, got dtype {t.dtype}")
    t = t.detach().to("cpu", torch.float64)
    if not torch.isfinite(t).all() or (t < 0).any():
        bad = t[~torch.isfinite(t) | (t < 0)]
        raise ValueError(f"{name} holds NaN, inf or negative values (e.g. {float(bad[0])})")
    return t


class Forecaster:
    """Forecast of the next window's load ``[L, E]`` from the windows given to :meth:`update`.

    Args:
        kind: ``"last"``, ``"ema"`` or ``"window"`` (see the module docstring).
        alpha: EMA weight of the newest window, in ``(0, 1]`` (``ema`` only; 1 is ``last``).
        window: how many recent windows ``window`` combines, an int ``>= 1``.
        reduce: ``"mean"`` or ``"sum"`` of those windows (``window`` only).

    Raises ``ValueError`` naming a bad argument or a bad load.
    """

    def __init__(self, kind: str = "ema", alpha: float = 0.5, window: int = 4, reduce: str = "mean"):
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} is not one of {KINDS}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.integer, np.floating)) or not 0 < alpha <= 1:
            raise ValueError(f"alpha={alpha!r} must be a number in (0, 1]")
        if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
            raise ValueError(f"window={window!r} must be an int >= 1")
        if reduce not in REDUCES:
            raise ValueError(f"reduce={reduce!r} is not one of {REDUCES}")
        self.kind, self.alpha, self.window, self.reduce = kind, float(alpha), int(window), reduce
        self._recent: deque[torch.Tensor] = deque(maxlen=self.window if kind == "window" else 1)  # [L, E] each
        self._ema: torch.Tensor | None = None  # [L, E] float64
        self.updates = 0

    @classmethod
    def from_spec(cls, spec: str) -> Forecaster:
        """``"last"`` | ``"ema:ALPHA"`` | ``"window:W"`` | ``"window:W:sum"`` -> a Forecaster."""
        parts = str(spec).strip().split(":")
        try:
            if parts[0] == "last" and len(parts) == 1:
                return cls("last")
            if parts[0] == "ema" and len(parts) == 2:
                return cls("ema", alpha=float(parts[1]))
            if parts[0] == "window" and len(parts) in (2, 3):
                return cls("window", window=int(parts[1]), reduce=parts[2] if len(parts) == 3 else "mean")
        except ValueError as exc:
            raise ValueError(f"forecast spec {spec!r}: {exc}") from None
        raise ValueError(f"forecast spec {spec!r} must be 'last', 'ema:ALPHA' or 'window:W[:sum]'")

    @property
    def spec(self) -> str:
        """The spec string that :meth:`from_spec` turns back into this forecaster."""
        if self.kind == "ema":
            return f"ema:{self.alpha:g}"
        if self.kind == "window":
            return f"window:{self.window}" + (":sum" if self.reduce == "sum" else "")
        return "last"

    def __repr__(self) -> str:
        return f"Forecaster({self.spec!r}, updates={self.updates})"

    @property
    def ready(self) -> bool:
        """Whether :meth:`predict` has something to say (at least one update)."""
        return self.updates > 0

    def reset(self) -> None:
        """Forget every window (e.g. after the model or the layer count changed)."""
        self._recent.clear()
        self._ema = None
        self.updates = 0

    def update(self, load) -> None:
        """Take one window's load ``[L, E]`` (torch or numpy, any real dtype; copied as float64).

        Raises ``ValueError`` for a non-2-D, negative or non-finite load, or one whose shape
        differs from the previous windows'.
        """
        t = _as_load(load)  # [L, E] float64
        if self.updates and t.shape != self._shape:
            raise ValueError(f"load has shape {tuple(t.shape)}, but earlier windows had {tuple(self._shape)}")
        self._shape = t.shape
        self.updates += 1
        if self.kind == "ema":
            self._ema = t.clone() if self._ema is None else self.alpha * t + (1 - self.alpha) * self._ema
        else:
            self._recent.append(t.clone())

    def predict(self) -> torch.Tensor:
        """The forecast of the next window, ``[L, E]`` float64 (a new tensor each call).

        Raises ``RuntimeError`` before the first :meth:`update`.
        """
        if not self.updates:
            raise RuntimeError(f"{self!r}: predict() before any update()")
        if self.kind == "ema":
            return self._ema.clone()
        if self.kind == "last":
            return self._recent[-1].clone()
        total = torch.stack(list(self._recent)).sum(0)  # [L, E]
        return total / len(self._recent) if self.reduce == "mean" else total


def forecast_series(loads, spec: str | Forecaster = DEFAULT_SPEC) -> torch.Tensor:
    """Forecasts along a trace: ``loads [T, L, E]`` -> ``[T, L, E]`` float64, where ``out[i]`` is
    the forecast made after windows ``0..i`` (the plan for window ``i + 1``). A given
    :class:`Forecaster` is continued from its state (and left updated)."""
    f = Forecaster.from_spec(spec) if isinstance(spec, str) else spec
    loads = loads if isinstance(loads, torch.Tensor) else torch.as_tensor(np.asarray(loads, dtype=np.float64))
    if loads.dim() != 3:
        raise ValueError(f"loads must be [T, L, E], got shape {tuple(loads.shape)}")
    out = torch.empty(loads.shape, dtype=torch.float64)
    for i, w in enumerate(loads):
        f.update(w)
        out[i] = f.predict()
    return out
