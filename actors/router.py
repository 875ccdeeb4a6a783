"""The serving side: turn each token's top-k logical experts into (worker, slot) dispatches.

The :class:`Router` holds the placement of one epoch. For a token's choice of logical expert ``e``
in layer ``l`` it picks one of ``e``'s ``logcnt[l, e]`` replicas round-robin (so an expert's tokens
are split evenly among its replicas, the split the solver assumes), sends every worker one
``forward(epoch, layer, local_slots, x)`` call for all its tokens, and combines the outputs with the
gate weights. It subscribes to the controller's published maps by long poll (``wait_map``), checked
without blocking before every dispatch; a worker that no longer holds the epoch answers
:class:`StaleEpochError`, and the router then fetches the newest map and re-routes those tokens
(a worker that died is waited for, up to ``timeout_s``, while Ray restarts it on the map in force).

Thread-safe: serving threads (e.g. a Ray Serve replica's thread pool) may share one Router; its
map, subscription, round-robin offset and counters change under one lock, and the workers' calls
run outside it, concurrently.
"""
from __future__ import annotations

import threading
import time
import uuid
from typing import Any, Sequence

import torch

from ray_eplb.actors.worker import StaleEpochError
from ray_eplb.topology import Placement


def route(placement: Placement, layer: int, topk_ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Global slot for each (token, choice), spreading each expert's tokens over its replicas.

    Args:
        placement: the map to route by.
        layer: MoE layer.
        topk_ids: ``[N, K]`` int64 logical experts chosen for each token.
        offset: round-robin start (the caller advances it between calls).

    Returns:
        ``[N * K]`` int64 slot ids (row-major over tokens then choices).
    """
    ids = topk_ids.reshape(-1).to(torch.int64)  # [N*K]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= placement.topology.num_experts):
        raise ValueError(f"expert ids must lie in [0, {placement.topology.num_experts})")
    cnt = placement.logcnt[layer, ids]  # [N*K]
    pick = (torch.arange(ids.numel(), dtype=torch.int64) + offset) % cnt  # [N*K] replica index
    return placement.log2phy[layer, ids, pick]  # [N*K]


def _weighted_buffer(x: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
    """``[N*K, H]`` zeros for the weighted expert outputs, in the wider of ``x``'s and ``topk_w``'s dtypes."""
    n, k = topk_w.shape
    return torch.zeros(n * k, x.shape[1], dtype=torch.promote_types(x.dtype, topk_w.dtype), device=x.device)


class Router:
    """Dispatches MoE layers to the worker actors and combines their outputs.

    Args:
        workers: one actor handle per rank.
        placement: the starting map (default: fetched from ``controller``).
        controller: the controller actor handle to subscribe to (``None``: a fixed map).
        timeout_s: deadline of one dispatch round.
        poll_timeout_s: long-poll duration of the map subscription.
        subscribe: long-poll the controller for new maps (``False``: ask it only when a worker
            answers :class:`StaleEpochError`, i.e. once the old epoch is released).
    """

    def __init__(
        self,
        workers: Sequence[Any],
        placement: Placement | None = None,
        controller: Any = None,
        timeout_s: float = 60.0,
        poll_timeout_s: float = 10.0,
        subscribe: bool = True,
    ):
        import ray

        self._ray = ray
        self.workers, self.controller = list(workers), controller
        self.id = f"router-{uuid.uuid4().hex[:8]}"
        self.timeout_s, self.poll_timeout_s, self.subscribe = timeout_s, poll_timeout_s, subscribe
        if placement is None:
            if controller is None:
                raise ValueError("give a placement or a controller to subscribe to")
            placement = ray.get(controller.wait_map.remote(-1, self.id, timeout_s))
        self.placement: Placement = placement
        self.map_id = placement.map_id()  # (epoch, digest) every dispatch carries
        t = placement.topology
        if len(self.workers) != t.num_gpus:
            raise ValueError(f"got {len(self.workers)} workers for {t.num_gpus} ranks")
        self._poll = None
        self._lock = threading.Lock()  # placement, _poll, _offset and the counters
        self._offset = 0
        self.rank_tokens = torch.zeros(t.num_layers, t.num_gpus, dtype=torch.int64)  # [L, G] routed
        self.max_stall_s = 0.0
        self.retries = 0
        self.map_updates = 0

    def __repr__(self) -> str:
        return f"Router({self.id}, epoch={self.placement.epoch}, map={self.map_id.digest}, ranks={len(self.workers)})"

    # ------------------------------------------------------------------ subscription
    def refresh(self, block: bool = False) -> bool:
        """Adopt a newer published map if one has arrived (``block``: ask the controller now, and
        adopt its map in force whenever it differs from ours, newer or not: a worker refused ours)."""
        if self.controller is None or not (block or self.subscribe):
            return False
        with self._lock:
            return self._refresh(block)

    def _refresh(self, block: bool) -> bool:
        ray = self._ray
        if block:
            self._poll = None
            try:
                # Known epoch -1: the map in force at once. No router id: this is no ack of epoch -1.
                newer = ray.get(self.controller.wait_map.remote(-1, None, 0.5), timeout=self.timeout_s)
            except ray.exceptions.RayError:  # the controller is restarting or slow: keep our map for now
                newer = None
        else:
            if self._poll is None:
                self._poll = self.controller.wait_map.remote(self.placement.epoch, self.id, self.poll_timeout_s)
            ready, _ = ray.wait([self._poll], timeout=0)
            if not ready:
                return False
            try:
                newer = ray.get(self._poll)
            except ray.exceptions.RayError:  # the controller died (Ray restarts it): poll again later
                newer = None
            self._poll = None
        adopted = newer is not None and (newer.epoch > self.placement.epoch or (block and newer.map_id() != self.map_id))
        if adopted:
            self.placement, self.map_id = newer, newer.map_id()
            self.map_updates += 1
        if self._poll is None and self.subscribe:  # re-subscribe at once: this poll also acks the map we now hold
            self._poll = self.controller.wait_map.remote(self.placement.epoch, self.id, self.poll_timeout_s)
        return adopted

    # ------------------------------------------------------------------ dispatch
    def dispatch(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        """MoE layer output ``sum_k topk_w[:, k] * expert_{topk_ids[:, k]}(x)``.

        Args:
            layer: MoE layer.
            x: ``[N, H]`` token activations.
            topk_ids: ``[N, K]`` logical experts per token.
            topk_w: ``[N, K]`` combine weights.

        Returns:
            ``[N, H]`` in ``x``'s dtype. The combine is transformers' own: each expert output times its
            weight in the wider of the two dtypes, summed over ``K`` in choice order, rounded once.
        """
        if x.dim() != 2 or topk_ids.shape != topk_w.shape or topk_ids.shape[0] != x.shape[0]:
            raise ValueError(f"shapes do not fit: x {tuple(x.shape)}, ids {tuple(topk_ids.shape)}, w {tuple(topk_w.shape)}")
        self.refresh()
        n, k = topk_ids.shape
        tok = torch.arange(n).repeat_interleave(k)  # [N*K] token of each assignment
        ids = topk_ids.reshape(-1)  # [N*K]
        w = topk_w.reshape(-1)  # [N*K]
        weighted = _weighted_buffer(x, topk_w)  # [N*K, H]
        todo = torch.ones(n * k, dtype=torch.bool)  # assignments not yet served
        t_first_stale = None
        down, deadline = 0, time.monotonic() + self.timeout_s
        while True:
            idx = todo.nonzero().squeeze(1)  # [M]
            with self._lock:
                p, map_id, offset = self.placement, self.map_id, self._offset
                self._offset += int(idx.numel())
            slots = route(p, layer, ids[idx].unsqueeze(1), offset)  # [M]
            ranks = slots // p.topology.slots_per_gpu
            local = slots % p.topology.slots_per_gpu
            calls = []
            for r in ranks.unique().tolist():
                m = idx[ranks == r]  # assignments for rank r
                ref = self.workers[r].forward.remote(map_id, layer, local[ranks == r], x[tok[m]])
                calls.append((r, m, ref))
            stale = False
            unavailable: dict[int, str] = {}  # rank -> why its tokens were not served
            for r, m, ref in calls:
                try:
                    y = self._ray.get(ref, timeout=max(0.1, deadline - time.monotonic()))  # [|m|, H]
                except StaleEpochError as exc:  # the map moved on (or the worker is not on it yet)
                    stale = True
                    unavailable[r] = f"refused map {map_id.epoch}: {exc.why}"
                    t_first_stale = t_first_stale or time.perf_counter()
                    continue
                except self._ray.exceptions.RayActorError as exc:  # the worker died: Ray restarts it
                    unavailable[r] = type(exc).__name__
                    t_first_stale = t_first_stale or time.perf_counter()
                    continue
                except self._ray.exceptions.GetTimeoutError:  # it did not answer by the deadline
                    self._ray.cancel(ref)
                    unavailable[r] = "no answer"
                    continue
                weighted[m] = y * w[m, None]
                with self._lock:
                    self.rank_tokens[layer, r] += int(m.numel())
                todo[m] = False
            if not bool(todo.any()):
                break
            with self._lock:
                self.retries += 1
            if time.monotonic() >= deadline:
                ranks_down = ", ".join(f"{r} ({why})" for r, why in sorted(unavailable.items())) or "none"
                raise RuntimeError(f"{self}: layer {layer}: not served within {self.timeout_s:g} s; "
                                   f"ranks unavailable: {ranks_down}")
            # A newer map re-routes at once. Otherwise wait, then re-route: a restarted worker comes
            # back on the committed map, and one on another map is brought onto the map in force by
            # the controller's next round.
            if not (stale and self.refresh(block=True)):
                time.sleep(min(1.0, 0.05 * 2**down))
                down += 1
        if t_first_stale is not None:
            with self._lock:
                self.max_stall_s = max(self.max_stall_s, time.perf_counter() - t_first_stale)
        return weighted.view(n, k, -1).sum(dim=1).to(x.dtype)

    def close(self) -> None:
        """Stop the subscription and tell the controller to stop waiting for this router's acks."""
        with self._lock:
            if self._poll is not None:
                self._ray.cancel(self._poll)
                self._poll = None
        if self.controller is not None:
            try:
                self.controller.forget_router.remote(self.id)  # fire and forget: the lease expires anyway
            except Exception:  # noqa: BLE001 - the controller may be gone; its lease on us lapses
                pass


class LocalRouter:
    """:meth:`Router.dispatch` over in-process :class:`~ray_eplb.actors.worker.ExpertWorker` objects
    (single-process use and tests): same routing and combine, a fixed map until :meth:`adopt`.

    Args:
        workers: one worker per rank.
        placement: the map to route by.
    """

    def __init__(self, workers: Sequence[Any], placement: Placement):
        if len(workers) != placement.topology.num_gpus:
            raise ValueError(f"got {len(workers)} workers for {placement.topology.num_gpus} ranks")
        self.workers, self.placement, self.map_id = list(workers), placement, placement.map_id()
        self._offset = 0

    def adopt(self, placement: Placement) -> None:
        """Route by ``placement`` from now on (its epoch must be committed on the workers)."""
        if placement.topology != self.placement.topology:
            raise ValueError("the new placement is for a different topology")
        self.placement, self.map_id = placement, placement.map_id()

    def dispatch(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        """``x [N, H]``, ``topk_ids [N, K]``, ``topk_w [N, K]`` -> ``[N, H]`` in ``x``'s dtype (see :meth:`Router.dispatch`)."""
        if x.dim() != 2 or topk_ids.shape != topk_w.shape or topk_ids.shape[0] != x.shape[0]:
            raise ValueError(f"shapes do not fit: x {tuple(x.shape)}, ids {tuple(topk_ids.shape)}, w {tuple(topk_w.shape)}")
        p = self.placement
        n, k = topk_ids.shape
        tok = torch.arange(n).repeat_interleave(k)  # [N*K]
        w = topk_w.reshape(-1)  # [N*K]
        slots = route(p, layer, topk_ids, self._offset)  # [N*K]
        self._offset += n * k
        ranks, local = slots // p.topology.slots_per_gpu, slots % p.topology.slots_per_gpu
        weighted = _weighted_buffer(x, topk_w)  # [N*K, H]
        for r in ranks.unique().tolist():
            m = (ranks == r).nonzero().squeeze(1)  # [M] assignments for rank r
            y = self.workers[r].forward(self.map_id, layer, local[m], x[tok[m]])  # [M, H]
            weighted[m] = y * w[m, None]
        return weighted.view(n, k, -1).sum(dim=1).to(x.dtype)
