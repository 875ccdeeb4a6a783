"""What the controller's ``status()`` returns and ``ray-eplb status`` shows: the state of a running
balancer as one typed, JSON-serialisable value (no tensors; the map itself comes from the
controller's ``current_map()``)."""
from __future__ import annotations

import time
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field


class WorkerStatus(BaseModel):
    """One rank as the controller last saw it.

    ``health``: ``ok`` (answered the last round on the map in force), ``off map`` (answered on
    another map; the next round brings it back), ``missing`` (missed the last round's deadline),
    ``rejected`` (its telemetry failed validation: ``detail`` says why) or ``not seen`` (no round yet).
    """

    model_config = ConfigDict(frozen=True)

    rank: int
    health: str
    epoch: Optional[int] = None
    digest: Optional[str] = None
    on_map: bool = False
    detail: Optional[str] = None


class RebalanceRecord(BaseModel):
    """The last committed rebalance: when, why, what moved, and the predicted gain it was solved for."""

    model_config = ConfigDict(frozen=True)

    epoch: int
    time: float
    reason: str
    planning: Optional[str] = None
    moved: int = 0
    bytes_moved: int = 0
    batches: int = 0
    swap_s: Optional[float] = None
    predicted_before: Optional[float] = None
    predicted_after: Optional[float] = None


class SwapProgress(BaseModel):
    """The swap under way (or the last one): batch ``batch`` of ``batches`` staged for ``epoch``."""

    model_config = ConfigDict(frozen=True)

    epoch: int
    batch: int
    batches: int
    done: bool


class ControllerStatus(BaseModel):
    """A running balancer, as ``ray-eplb status`` prints it (``model_dump_json()`` for ``--json``).

    Balancedness is mean over max GPU load (1.0: perfectly even): ``balancedness_now`` is measured
    on the recent load window under the map in force, ``balancedness_forecast`` is the map in force
    on the forecast the next solve plans on. ``None`` until the workers have routed a token.
    """

    model_config = ConfigDict(frozen=True)

    namespace: str
    topology: dict[str, Any]
    epoch: int
    digest: str
    next_epoch: int
    recovery: str
    loop: str
    started: float
    rounds: int
    tokens_seen: float
    balancedness_now: Optional[float] = None
    balancedness_forecast: Optional[float] = None
    rebalances: int
    aborts: int
    experts_moved: int
    bytes_moved: int
    last_rebalance: Optional[RebalanceRecord] = None
    last_abort: Optional[str] = None
    swap: Optional[SwapProgress] = None
    workers: list[WorkerStatus]
    routers: dict[str, int]
    errors: list[str]
    phase_seconds: dict[str, float]
    config: dict[str, Any]
    transfer_batches: int = 0
    unmapped_tokens: float = 0.0
    retired_epochs: list[int] = Field(default_factory=list)

    @property
    def missing(self) -> list[int]:
        """Ranks that missed the last round's deadline."""
        return [w.rank for w in self.workers if w.health == "missing"]

    @property
    def off_map(self) -> list[int]:
        """Ranks seen on another map than the one in force."""
        return [w.rank for w in self.workers if w.epoch is not None and not w.on_map]

    @property
    def rejected(self) -> dict[int, str]:
        """Ranks whose telemetry the last round left out, with why."""
        return {w.rank: w.detail or "" for w in self.workers if w.health == "rejected"}

    def lines(self) -> list[str]:
        """The status as text lines for a terminal."""
        def pct(x: float | None) -> str:
            return "-" if x is None else f"{x:.3f}"

        up = time.time() - self.started
        t = self.topology
        out = [
            f"balancer {self.namespace}: epoch {self.epoch} (map {self.digest[:12]}), loop {self.loop}, "
            f"up {up:.0f} s, {self.rounds} rounds, recovery: {self.recovery}",
            f"shape: {t['num_nodes']} nodes x {t['gpus_per_node']} ranks x {t['slots_per_gpu']} slots, "
            f"{t['num_experts']} experts x {t['num_layers']} layers",
            f"balancedness: measured {pct(self.balancedness_now)} on the recent window, "
            f"{pct(self.balancedness_forecast)} predicted on the forecast",
            f"rebalances {self.rebalances}, aborts {self.aborts}, {self.experts_moved} slots and "
            f"{self.bytes_moved / 2**20:.1f} MiB moved in all",
        ]
        r = self.last_rebalance
        if r is None:
            out.append("last rebalance: none yet")
        else:
            ago = time.time() - r.time
            out.append(f"last rebalance: epoch {r.epoch}, {ago:.0f} s ago ({r.reason}, {r.planning or '-'}): "
                       f"{r.moved} slots, {r.bytes_moved / 2**20:.1f} MiB in {r.batches} batches"
                       f"{'' if r.swap_s is None else f', {r.swap_s:.2f} s'}; predicted "
                       f"{pct(r.predicted_before)} -> {pct(r.predicted_after)}")
        if self.last_abort:
            out.append(f"last abort: {self.last_abort}")
        if self.swap is not None and not self.swap.done:
            out.append(f"swap to epoch {self.swap.epoch}: batch {self.swap.batch} of {self.swap.batches}")
        for w in self.workers:
            where = "-" if w.epoch is None else f"epoch {w.epoch}"
            out.append(f"  rank {w.rank}: {w.health}, {where}{'' if w.on_map else ' (not on the map in force)'}"
                       f"{'' if not w.detail else ': ' + w.detail}")
        for err in self.errors[-3:]:
            out.append(f"recent error: {err}")
        cfg = self.config
        out.append("config: " + ", ".join(f"{k}={cfg[k]}" for k in sorted(cfg)))
        return out
