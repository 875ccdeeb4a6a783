"""What an operator asks a running balancer, beside the control round itself: its status as one
typed value (:class:`~ray_eplb.controller.status.ControllerStatus`), a dry-run plan (solve on the
forecast, apply nothing), a timeline of rounds and the per-GPU loads around each rebalance (for
plots), swap progress, and the per-layer / per-rank views exported as metrics. A mixin of
:class:`~ray_eplb.controller.balancer.EplbController` (uses its ``placement``, ``forecast``,
``window_load``, ``config``, ``metrics``, ``_history``, ``_worker_maps`` and friends).

Shapes: load ``[L, E]`` float64, per-GPU load ``[L, G]``, ``phy2log [L, R]``.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

import torch

from ray_eplb.controller.status import ControllerStatus, RebalanceRecord, SwapProgress, WorkerStatus

#: Rounds kept in the timeline (one sample per round: at a 2 s interval, about 2 hours).
TIMELINE_ROUNDS = 4096
#: Rebalances whose before/after per-GPU loads are kept for the heatmap.
KEPT_LOADS = 8


class Operations:
    """Status, dry-run planning, timeline and metric views for :class:`EplbController`."""

    # State is created on first use: the controller's constructor does not know about this mixin.
    def _ops_state(self) -> dict:
        st = self.__dict__.get("_ops")
        if st is None:
            st = self.__dict__["_ops"] = {"timeline": deque(maxlen=TIMELINE_ROUNDS), "loads": {}, "swap": None}
        return st

    # ------------------------------------------------------------------ status
    async def status(self) -> ControllerStatus:
        """The balancer's status as a :class:`ControllerStatus` (typed, JSON-serialisable, no tensors;
        the placement itself is :meth:`current_map`)."""
        st = await self._status_fields()
        current = tuple(self.placement.map_id())
        workers = []
        for rank in range(self.topology.num_gpus):
            seen = self._worker_maps.get(rank)
            epoch, digest = (None, None) if seen is None else seen
            on_map = seen is not None and tuple(seen) == current
            if rank in self._rejected:
                health, detail = "rejected", self._rejected[rank]
            elif rank in self._missing:
                health, detail = "missing", "missed the last round's deadline"
            elif seen is None:
                health, detail = "not seen", None
            else:
                health, detail = ("ok" if on_map else "off map"), None
            workers.append(WorkerStatus(rank=rank, health=health, epoch=epoch, digest=digest, on_map=on_map, detail=detail))
        last = next((h for h in reversed(self._history) if h.get("action") == "committed"), None)
        abort = next((h for h in reversed(self._history) if h.get("action") == "aborted"), None)
        swap = self._ops_state()["swap"]
        if swap is not None and any(h.get("epoch") == swap["epoch"] and h.get("action") in ("committed", "aborted")
                                    for h in self._history[-10:]):
            swap = {**swap, "done": True}  # an aborted swap is over too, whichever batch it reached
        return ControllerStatus(
            namespace=getattr(self, "namespace", "local"), topology=self.topology.model_dump(), epoch=st["epoch"], digest=st["digest"],
            next_epoch=st["next_epoch"], recovery=st["recovery"], loop=st["loop"], started=st["started"],
            rounds=st["rounds"], tokens_seen=float(st["tokens_seen"]), balancedness_now=st["balancedness_now"],
            balancedness_forecast=st["balancedness_forecast"], rebalances=st["rebalances"], aborts=st["aborts"],
            experts_moved=st["experts_moved"], bytes_moved=st["bytes_moved"],
            last_rebalance=None if last is None else RebalanceRecord(
                epoch=last["epoch"], time=last["time"], reason=last.get("reason", "explicit"),
                planning=last.get("planning"), moved=last.get("moved", 0), bytes_moved=last.get("bytes_moved", 0),
                batches=last.get("batches", 0), swap_s=last.get("swap_s"),
                predicted_before=last.get("predicted_before"), predicted_after=last.get("predicted_after")),
            last_abort=None if abort is None else (f"epoch {abort.get('epoch')} in {abort.get('phase')} at "
                                                   f"{time.strftime('%H:%M:%S', time.localtime(abort['time']))}: "
                                                   f"{abort.get('failures')}"),
            swap=None if swap is None else SwapProgress(**swap),
            workers=workers, routers=st["routers"], errors=st["errors"],
            phase_seconds={k: float(v) for k, v in st["phase_seconds"].items()}, config=st["config"],
            transfer_batches=st["transfer_batches"], unmapped_tokens=float(st["unmapped_tokens"]),
            retired_epochs=st["retired_epochs"],
        )

    async def report(self) -> ControllerStatus:
        """The same as :meth:`status` (the name ``ray-eplb status`` and the service handle use)."""
        return await self.status()

    # ------------------------------------------------------------------ dry run
    async def plan_only(self, fresh: bool = False) -> dict:
        """Solve on the forecast as a rebalance would, and apply nothing.

        Returns ``action`` (``plan`` or ``no_load``), ``planning``, ``predicted_before`` /
        ``predicted_after`` (balancedness of the map in force and of the plan on the forecast),
        ``gain``, ``min_gain``, ``would_apply`` (whether the loop would push it: gain >= min_gain),
        ``moved`` (slots that would change), ``moved_per_layer``, ``bytes_estimate`` (moved x one
        expert's bytes, when known), ``transfers`` (by kind) and ``phy2log`` (the plan, nested lists).
        """
        from ray_eplb.controller.planning import budget_slots, solve
        from ray_eplb.controller.transfer import plan_summary, transfer_plan

        lock, _ = self._sync()
        async with lock:
            await self._ready()
            forecast = self.forecast  # [L, E]
            if forecast is None:
                return {"action": "no_load", "why": "no load seen yet: the workers have routed no token"}
            cfg, current = self.config, self.placement
            fresh = fresh or cfg.planning == "fresh"
            t0 = time.monotonic()
            new = await asyncio.to_thread(solve, self.topology, forecast, current, cfg, fresh=fresh, epoch=self._next_epoch)
            solve_s = time.monotonic() - t0
        before, after = self._balancedness(current, forecast), self._balancedness(new, forecast)
        gain = (after or 0.0) - (before or 0.0)
        changed = current.changed_slots(new)  # [L, R]
        moves = transfer_plan(current, new)
        return {
            "action": "plan", "planning": "fresh" if fresh else "incremental", "from_epoch": current.epoch,
            "predicted_before": before, "predicted_after": after, "gain": gain, "min_gain": cfg.min_gain,
            "would_apply": gain >= cfg.min_gain and bool(changed.any()), "moved": int(changed.sum()),
            "moved_per_layer": changed.sum(1).tolist(), "budget_slots": budget_slots(self.topology, cfg, fresh),
            "bytes_estimate": len(moves) * self._expert_bytes if self._expert_bytes else None,
            "transfers": plan_summary(moves, self.topology), "solve_s": solve_s, "phy2log": new.phy2log.tolist(),
        }

    # ------------------------------------------------------------------ rounds, views, metrics
    def observe_round(self, rec: dict) -> None:
        """After each round: add it to the timeline, export the per-layer and per-rank views, and,
        after a committed rebalance, keep the per-GPU loads before and after it (on the forecast it
        was solved for)."""
        from ray_eplb.solver import balancedness_per_layer, gpu_loads

        ops = self._ops_state()
        p, g = self.placement, self.topology.num_gpus
        ops["timeline"].append({"time": rec.get("time", time.time()), "round": rec.get("round"), "epoch": p.epoch,
                                "balancedness_now": rec.get("balancedness_now"), "action": rec.get("action")})
        window = self.window_load()  # [L, E]
        if float(window.sum()) > 0:
            per_layer = balancedness_per_layer(p.phy2log, p.logcnt, window, g)  # [L]
            for layer, b in enumerate(per_layer.tolist()):
                self.metrics.gauge("eplb_layer_balancedness", b, {"layer": str(layer)})
            per_rank = gpu_loads(p.phy2log, p.logcnt, window, g).sum(0)  # [G] tokens per rank over the window
            for rank, v in enumerate(per_rank.tolist()):
                self.metrics.gauge("eplb_rank_load", v, {"rank": str(rank)})
        if rec.get("action") == "committed" and self.forecast is not None:
            old = self._placements.get(rec.get("from_epoch"))
            if old is not None:
                fc = self.forecast
                ops["loads"][p.epoch] = {
                    "epoch": p.epoch, "from_epoch": old.epoch, "time": rec.get("time"),
                    "before": gpu_loads(old.phy2log, old.logcnt, fc, g).tolist(),  # [L, G]
                    "after": gpu_loads(p.phy2log, p.logcnt, fc, g).tolist(),  # [L, G]
                }
                for e in sorted(ops["loads"])[:-KEPT_LOADS]:
                    del ops["loads"][e]

    def swap_progress(self, epoch: int, batch: int, batches: int) -> None:
        """Called by the swap as each transfer batch is staged (``batch`` of ``batches``, from 1)."""
        self._ops_state()["swap"] = {"epoch": epoch, "batch": batch, "batches": batches, "done": batch >= batches}
        self.metrics.gauge("eplb_swap_progress", batch / max(1, batches))

    async def timeline(self) -> list[dict]:
        """One sample per round: ``time``, ``round``, ``epoch``, ``balancedness_now``, ``action``."""
        return list(self._ops_state()["timeline"])

    async def rebalance_loads(self) -> list[dict]:
        """Per kept rebalance: ``epoch``, ``from_epoch``, ``time`` and the per-GPU loads ``before``
        and ``after`` (``[L, G]`` nested lists) on the forecast it was solved for; oldest first."""
        loads = self._ops_state()["loads"]
        return [loads[e] for e in sorted(loads)]

    async def recorded_loads(self) -> dict:
        """What the balancer has recorded, for export as engine records: ``window`` (the recent
        window's rounds, ``[T, L, E]`` nested lists, oldest first), ``total`` (every round since this
        controller started, ``[L, E]``), ``rounds``, and the placement in force (``epoch``,
        ``phy2log [L, R]``, ``topology`` fields)."""
        await self._ready()
        total = self.load.total
        if total is None:
            total = torch.zeros(self.topology.num_layers, self.topology.num_experts, dtype=torch.float64)
        return {"window": self.load.window_rounds().tolist(), "total": total.tolist(), "rounds": self._rounds,
                "epoch": self.placement.epoch, "phy2log": self.placement.phy2log.tolist(),
                "topology": self.topology.model_dump()}


def tensor_free(value: Any) -> Any:
    """``value`` with tensors turned into nested lists (for JSON output of history records)."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): tensor_free(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [tensor_free(v) for v in value]
    return value
