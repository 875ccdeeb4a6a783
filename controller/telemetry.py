"""Telemetry state of the controller: cumulative per-slot counts in, logical load and forecast out;
no metrics here (see :mod:`ray_eplb.controller.metrics`)."""
from __future__ import annotations

import math
from collections import deque
from typing import Any

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
        self.total: torch.Tensor | None = None  # [L, E] every round since this tracker started
        self.unmapped = 0.0
        self.rejected: dict[int, str] = {}  # rank -> why its reply was left out of the last round

    def aggregate(self, results: dict[int, dict], placements: dict[int, Placement]) -> torch.Tensor:
        """New tokens since the last round, as logical load ``[L, E]`` float64.

        ``results[rank]``: a worker's ``collect`` reply, counts ``[len(epochs), L, S]`` cumulative per
        epoch; ``placements``: epoch -> placement (counts of an unknown epoch are only tallied).
        Each reply is checked first (:meth:`check`); a bad one is left out of this round, whole,
        and named in :attr:`rejected` (``{rank: why}``, this round's); the others count as usual.
        """
        t = self.topology
        delta = torch.zeros(t.num_layers, t.num_experts, dtype=torch.float64)  # [L, E]
        self.rejected = {}
        for rank, res in results.items():
            try:
                life, per_epoch = self.check(rank, res)
            except ValueError as exc:
                self.rejected[rank] = str(exc)
                continue
            for epoch, counts, d in per_epoch:
                self._seen[(rank, epoch)] = (life, counts)
                p = placements.get(epoch)
                if p is None:
                    self.unmapped += float(d.sum())
                    continue
                delta.scatter_add_(1, p.rank_experts(rank), d.to(torch.float64))
            reported = {epoch for epoch, _, _ in per_epoch}
            for key in [k for k in self._seen if k[0] == rank and k[1] not in reported]:
                del self._seen[key]
        self.tokens += float(delta.sum())
        return delta

    def check(self, rank: int, res: Any) -> tuple[str | None, list[tuple[int, torch.Tensor, torch.Tensor]]]:
        """Validate one ``collect`` reply; ``(incarnation, [(epoch, counts [L, S], new since last [L, S])])``.

        Raises ``ValueError`` naming what is wrong: not a reply of ``rank``, a dtype other than
        int64, a shape other than ``[len(epochs), L, S]``, a byte count that does not fit it,
        negative or implausibly large counts (over 2**53, where float64 stops counting exactly), or
        a counter that went backwards within one worker incarnation (a restarted worker counts
        from zero again and is told apart by its ``incarnation``)."""
        t = self.topology
        if not isinstance(res, dict) or res.get("rank") != rank:
            raise ValueError(f"rank {rank}: not a telemetry reply of this rank")
        if res.get("dtype") != "int64":
            raise ValueError(f"rank {rank}: counts dtype {res.get('dtype')!r}, expected 'int64'")
        epochs = res.get("epochs")
        if not isinstance(epochs, list) or not all(isinstance(e, int) and e >= 0 for e in epochs):
            raise ValueError(f"rank {rank}: epochs {epochs!r} is not a list of epoch numbers")
        want = (len(epochs), t.num_layers, t.slots_per_gpu)
        if tuple(res.get("shape", ())) != want:
            raise ValueError(f"rank {rank}: counts shape {res.get('shape')!r}, expected {want}")
        raw = res.get("counts")
        if not isinstance(raw, (bytes, bytearray, memoryview)) or len(raw) != 8 * math.prod(want):
            raise ValueError(f"rank {rank}: counts carry {len(raw) if raw is not None else 0} bytes, "
                             f"expected {8 * math.prod(want)} for int64 {want}")
        counts = decode_counts(res)  # [n_epochs, L, S]
        if counts.numel() and (int(counts.min()) < 0 or int(counts.max()) > 2**53):
            raise ValueError(f"rank {rank}: counts out of range [0, 2**53] (min {int(counts.min())}, max {int(counts.max())})")
        life = res.get("incarnation")
        out = []
        for epoch, c in zip(epochs, counts):
            prev_life, prev = self._seen.get((rank, epoch), (None, None))
            if prev is not None and prev_life == life:
                if bool((c < prev).any()):
                    layer, slot = (c < prev).nonzero()[0].tolist()
                    raise ValueError(f"rank {rank}: epoch {epoch} counter of layer {layer} slot {slot} went backwards "
                                     f"({int(prev[layer, slot])} -> {int(c[layer, slot])}) within one incarnation")
                out.append((epoch, c, c - prev))
            else:
                out.append((epoch, c, c))
        return life, out

    def reconfigure(self, window: int, forecast: str) -> None:
        """Keep the last ``window`` rounds; a different forecast spec starts a fresh forecaster."""
        self._window = deque(self._window, maxlen=window)
        if Forecaster.from_spec(forecast).spec != self.forecaster.spec:
            self.forecaster = Forecaster.from_spec(forecast)

    def update(self, delta: torch.Tensor) -> None:
        """Add one round ``delta [L, E]`` to the window and, if it saw tokens, to the forecaster
        (an idle round says nothing about which experts the next tokens will need)."""
        self._window.append(delta)
        self.total = delta.clone() if self.total is None else self.total + delta
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

    def window_rounds(self) -> torch.Tensor:
        """``[T, L, E]`` float64: the rounds of the recent window, oldest first (``T`` may be 0)."""
        if not self._window:
            return torch.zeros(0, self.topology.num_layers, self.topology.num_experts, dtype=torch.float64)
        return torch.stack(list(self._window))
