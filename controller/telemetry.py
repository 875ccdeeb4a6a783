"""Telemetry state of the controller: cumulative per-slot counts in, logical load and forecast out;
no metrics here (see :mod:`ray_eplb.controller.metrics`)."""
from __future__ import annotations

from collections import deque

import torch

from ray_eplb.actors.worker import decode_counts
from ray_eplb.controller.forecast import Forecaster
from ray_eplb.topology import Placement, Topology


class LoadTracker:
    """Turns the workers' cumulative per-(layer, slot) counters into per-round logical load.

    Workers report counts cumulatively per epoch, so a round that misses a worker loses nothing:
    its tokens show up in the next round's difference. Each epoch's counts are mapped to logical
    experts through that epoch's ``phy2log``.

    Args:
        topology: the deployment shape.
        window: rounds kept in the recent window.
        forecast: a :class:`~ray_eplb.controller.forecast.Forecaster` spec (``"ema:0.5"``, ...),
            fed every round that routed at least one token.
    """

    def __init__(self, topology: Topology, window: int, forecast: str):
        self.topology = topology
        self.forecaster = Forecaster.from_spec(forecast)
        # (rank, epoch) -> (the worker's incarnation, its cumulative counts [L, S])
        self._seen: dict[tuple[int, int], tuple[str | None, torch.Tensor]] = {}
        self._window: deque[torch.Tensor] = deque(maxlen=window)  # rounds of [L, E]
        self.tokens = 0.0
        self.unmapped = 0.0

    def aggregate(self, results: dict[int, dict], placements: dict[int, Placement]) -> torch.Tensor:
        """New tokens since the last round, as logical load ``[L, E]`` float64.

        ``results[rank]``: a worker's ``collect`` reply, counts ``[len(epochs), L, S]`` cumulative per
        epoch; ``placements``: epoch -> placement (counts of an unknown epoch are only tallied).
        """
        t = self.topology
        delta = torch.zeros(t.num_layers, t.num_experts, dtype=torch.float64)  # [L, E]
        for rank, res in results.items():
            reported = set()
            life = res.get("incarnation")  # a restarted worker counts from zero again
            for epoch, counts in zip(res["epochs"], decode_counts(res)):
                reported.add(epoch)
                prev_life, prev = self._seen.get((rank, epoch), (None, None))
                d = counts if prev is None or prev_life != life else counts - prev  # [L, S]
                self._seen[(rank, epoch)] = (life, counts)
                p = placements.get(epoch)
                if p is None:
                    self.unmapped += float(d.sum())
                    continue
                delta.scatter_add_(1, p.rank_experts(rank), d.to(torch.float64))
            for key in [k for k in self._seen if k[0] == rank and k[1] not in reported]:
                del self._seen[key]
        self.tokens += float(delta.sum())
        return delta

    def reconfigure(self, window: int, forecast: str) -> None:
        """Keep the last ``window`` rounds; a different forecast spec starts a fresh forecaster."""
        self._window = deque(self._window, maxlen=window)
        if Forecaster.from_spec(forecast).spec != self.forecaster.spec:
            self.forecaster = Forecaster.from_spec(forecast)

    def update(self, delta: torch.Tensor) -> None:
        """Add one round ``delta [L, E]`` to the window and, if it saw tokens, to the forecaster
        (an idle round says nothing about which experts the next tokens will need)."""
        self._window.append(delta)
        if float(delta.sum()) > 0:
            self.forecaster.update(delta)

    @property
    def forecast(self) -> torch.Tensor | None:
        """``[L, E]`` float64 forecast of the next round's load (``None`` before any token)."""
        return self.forecaster.predict() if self.forecaster.ready else None

    def window_load(self) -> torch.Tensor:
        """``[L, E]`` float64 load of the recent window (sum of its rounds)."""
        if not self._window:
            return torch.zeros(self.topology.num_layers, self.topology.num_experts, dtype=torch.float64)
        return torch.stack(list(self._window)).sum(0)
