"""The EPLB controller as a plain async class (the Ray actor wraps it; unit tests drive it directly).

One :meth:`EplbController.step` is one control round:

1. **collect** cumulative per-(layer, slot) token counts from every worker, in parallel, under a
   deadline (a worker that misses it is skipped this round; its counts arrive with the next one,
   because they are cumulative and diffed here);
2. **aggregate** the new counts to logical load ``[L, E]`` through the ``phy2log`` of the epoch they
   were served under;
3. **forecast** the next round's load (``config.forecast``: EMA, window mean or last round), and
   the recent window's balancedness;
4. **decide** (periodic / drift / forced) and **solve** (:mod:`~ray_eplb.controller.planning`, in a
   thread): incremental from the current placement under the move budget and hysteresis, or fresh;
5. **push** (:mod:`~ray_eplb.controller.swap`): plan the transfers, **prepare** them batch by batch
   on the workers, **commit** on all or **abort** on all, **publish** the new map to routers, and
   later **release** the retired epoch.

Every epoch goes through the balancer's store, and a worker found on another map than the one in
force is brought back onto it first (:mod:`~ray_eplb.controller.recovery`). Workers are
handle-likes (see :mod:`~ray_eplb.controller.fanout`); nothing here blocks the event loop on a worker.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any, Sequence

import torch

from ray_eplb.actors.map_store import MemoryStore
from ray_eplb.controller.config import ControllerConfig
from ray_eplb.controller.fanout import fanout, wait_for
from ray_eplb.controller.loop import Loop
from ray_eplb.controller.metrics import NullMetrics
from ray_eplb.controller.operations import Operations
from ray_eplb.controller.planning import budget_slots, decide, solve
from ray_eplb.controller.publishing import Publishing
from ray_eplb.controller.recovery import Recovery
from ray_eplb.controller.swap import push
from ray_eplb.controller.telemetry import LoadTracker
from ray_eplb.solver import balancedness
from ray_eplb.topology import Placement, Topology

log = logging.getLogger("ray_eplb.controller")


class EplbController(Recovery, Operations, Publishing):
    """Telemetry, forecast, decision, solve and the two-phase push for one expert-parallel group.

    Args:
        topology: the deployment shape.
        workers: one handle per rank (index = rank).
        config: the controller configuration.
        placement: the placement the workers start with (default: ``Placement.identity``); on
            a restart the controller takes the committed map from ``store`` instead (see :meth:`recover`).
        metrics: a sink with ``gauge`` / ``count`` / ``refresh`` (the Ray actor passes ``ray.util.metrics``).
        store: where epochs are made durable (:class:`~ray_eplb.actors.map_store.MapStore` in Ray;
            default an in-memory one).
        restart: this is a restart of a running balancer (take the store's map), not a fresh start.
    """

    def __init__(
        self,
        topology: Topology,
        workers: Sequence[Any],
        config: ControllerConfig | None = None,
        placement: Placement | None = None,
        metrics: Any = None,
        store: Any = None,
        restart: bool = False,
    ):
        if len(workers) != topology.num_gpus:
            raise ValueError(f"got {len(workers)} workers for a topology of {topology.num_gpus} ranks")
        self.topology, self.workers = topology, list(workers)
        self.config = config or ControllerConfig()
        self.placement = placement or Placement.identity(topology)
        self.metrics = metrics or NullMetrics()
        self.store = store if store is not None else MemoryStore()
        self._fresh_start = not restart
        self._loop_intent = "idle"  # running | stopped | idle: persisted, so a restart resumes it
        self._recovery = "not started"
        self._worker_maps: dict[int, tuple[int, str | None]] = {}  # rank -> (epoch, digest) last reported
        self._rejected: dict[int, str] = {}
        self._reports: dict[int, dict] = {}
        self._placements: dict[int, Placement] = {self.placement.epoch: self.placement}
        self._next_epoch = self.placement.epoch + 1
        self.load = LoadTracker(topology, self.config.window, self.config.forecast)
        self._routers: dict[str, tuple[int, float]] = {}  # id -> (known epoch, last poll)
        self._retired: dict[int, float] = {}  # epoch -> retire time
        self._history: list[dict] = []
        self._background: set[asyncio.Future] = set()
        self._phase_s: dict[str, float] = {}
        self._last_rebalance = time.monotonic()
        self._recovered = False
        self._rounds = self._rebalances = self._aborts = self._moved = self._bytes = self._batches = 0
        self._expert_bytes = 0  # bytes of one expert's weights, read from the workers by recover()
        self._missing: list[int] = []
        self._errors: deque[str] = deque(maxlen=20)
        self._lock: asyncio.Lock | None = None
        self._published: asyncio.Condition | None = None
        self._loop = Loop(self.step, self.config.interval_s, lambda phase, exc: self._fail({}, phase, exc))
        self.started = time.time()

    # ------------------------------------------------------------------ plumbing
    def _sync(self) -> tuple[asyncio.Lock, asyncio.Condition]:
        if self._lock is None:
            self._lock, self._published = asyncio.Lock(), asyncio.Condition()
        return self._lock, self._published

    async def _fanout(self, method: str, args: Sequence[tuple] | dict[int, tuple], timeout_s: float) -> tuple[dict, dict]:
        return await fanout(self.workers, method, args, timeout_s)

    def _fire(self, method: str, *args: Any) -> None:
        """Send ``method(*args)`` to every worker without waiting (release)."""
        for w in self.workers:
            fut = asyncio.ensure_future(wait_for(getattr(w, method).remote(*args)))
            self._background.add(fut)
            fut.add_done_callback(self._background.discard)

    def _timed(self, phase: str, t0: float) -> None:
        self._phase_s[phase] = dt = time.monotonic() - t0
        self.metrics.gauge("eplb_phase_seconds", dt, {"phase": phase})

    # ------------------------------------------------------------------ telemetry
    async def telemetry(self) -> torch.Tensor:
        """Collect, aggregate and forecast; returns this round's logical load ``[L, E]`` float64."""
        t0 = time.monotonic()
        results, failures = await self._fanout("collect", [()] * len(self.workers), self.config.collect_timeout_s)
        self._missing = sorted(failures)
        self._timed("collect", t0)
        t0 = time.monotonic()
        delta = self.load.aggregate(results, self._placements)  # [L, E]
        self._rejected = dict(self.load.rejected)
        for rank, why in self._rejected.items():
            self._errors.append(f"telemetry of rank {rank} left out: {why}")
            self.metrics.count("eplb_telemetry_rejected_total", 1.0, {"rank": str(rank)})
            log.warning("telemetry of rank %d left out: %s", rank, why)
        self._reports = {r: res for r, res in results.items() if r not in self._rejected}
        self._worker_maps = {r: (int(res["epoch"]), res.get("digest")) for r, res in self._reports.items()}
        self._timed("aggregate", t0)
        t0 = time.monotonic()
        self.load.update(delta)
        self._timed("forecast", t0)
        return delta

    def window_load(self) -> torch.Tensor:
        """``[L, E]`` float64 load of the recent window."""
        return self.load.window_load()

    @property
    def forecast(self) -> torch.Tensor | None:
        """``[L, E]`` float64 forecast of the next round's load (``None`` before any token)."""
        return self.load.forecast

    def _balancedness(self, p: Placement, load: torch.Tensor) -> float | None:
        return balancedness(p.phy2log, p.logcnt, load, self.topology.num_gpus) if float(load.sum()) > 0 else None

    # ------------------------------------------------------------------ the round
    async def step(self, force: bool = False, fresh: bool = False) -> dict:
        """One control round (see the module docstring). Returns its record; never raises.
        ``force``: rebalance whatever the trigger and gain say; ``fresh``: solve from scratch."""
        lock, _ = self._sync()
        async with lock:
            rec: dict[str, Any] = {"round": self._rounds, "time": time.time(), "forced": force}
            self._rounds += 1
            self.metrics.refresh()  # keep the last gauge values on the Prometheus endpoint
            try:
                await self._ready()
                await self.telemetry()
                rec["missing"] = list(self._missing)
                if self._rejected:
                    rec["rejected"] = dict(self._rejected)
            except Exception as exc:  # noqa: BLE001 - a failed round is reported, the loop goes on
                return self._fail(rec, "telemetry", exc)
            off = self._off_map(self._reports)
            if off:  # first bring every rank onto the map in force
                try:
                    rec.update(await self._heal(off))
                except Exception as exc:  # noqa: BLE001 - reported; the next round tries again
                    return self._fail(rec, "heal", exc)
                self._maybe_release()
                return self._record(rec)
            t0 = time.monotonic()
            window = self.window_load()
            bal_now = self._balancedness(self.placement, window)
            rec["balancedness_now"] = bal_now
            if bal_now is not None:
                self.metrics.gauge("eplb_balancedness", bal_now)
            reason = decide(self.config, force, self.forecast is not None, float(window.sum()), bal_now,
                            time.monotonic() - self._last_rebalance)
            self._timed("decide", t0)
            if reason is not None:
                rec.update(await self._rebalance(reason, force, fresh))
            self._maybe_release()
            return rec

    async def _rebalance(self, reason: str, force: bool, fresh: bool = False) -> dict:
        forecast = self.forecast  # [L, E]
        if forecast is None:
            return {"action": "skipped", "why": "no load seen yet"}
        t0 = time.monotonic()
        cfg = self.config
        fresh = fresh or cfg.planning == "fresh"
        try:
            new = await asyncio.to_thread(solve, self.topology, forecast, self.placement, cfg, fresh=fresh, epoch=self._next_epoch)
        except Exception as exc:  # noqa: BLE001
            return self._fail({}, "solve", exc)
        self._timed("solve", t0)
        self.metrics.gauge("eplb_solve_seconds", self._phase_s["solve"])
        pred_cur = self._balancedness(self.placement, forecast)
        pred_new = self._balancedness(new, forecast)
        gain = (pred_new or 0.0) - (pred_cur or 0.0)
        info = {"reason": reason, "planning": "fresh" if fresh else "incremental", "predicted_before": pred_cur,
                "predicted_after": pred_new, "solve_s": self._phase_s["solve"]}
        budget = budget_slots(self.topology, cfg, fresh)
        if budget is not None:
            info["budget_slots"] = budget
        self._last_rebalance = time.monotonic()
        if not force and gain < cfg.min_gain:
            return {**info, "action": "skipped", "why": f"predicted gain {gain:.4f} < min_gain {cfg.min_gain}"}
        return await self.apply(new, info)

    async def apply(self, new: Placement, info: dict | None = None) -> dict:
        """Push ``new`` (any epoch number; it gets the next one): plan, prepare all (batch by batch),
        commit all or abort all, publish. Returns the outcome record (also appended to :meth:`history`,
        with ``info``): ``moved`` (slots), ``bytes_moved``, ``batches``, ``batch_sizes``,
        ``transfers`` (by kind), ``swap_s``, and ``budget_used`` (moved / ``info["budget_slots"]``)."""
        if new.topology != self.topology:
            raise ValueError("placement is for another topology")
        changed = bool(self.placement.changed_slots(new).any())
        # A fresh number, durable before any worker sees it, used up even if the round aborts.
        epoch = self._allocate_epoch() if changed else self._next_epoch
        new = new.with_epoch(epoch)
        rec: dict[str, Any] = {**(info or {}), "epoch": epoch, "from_epoch": self.placement.epoch, "time": time.time()}
        t_swap = time.monotonic()
        if changed and not self._expert_bytes:
            states, _ = await self._fanout("state", [()] * len(self.workers), self.config.collect_timeout_s)
            self._expert_bytes = max([int(st.get("expert_bytes", 0)) for st in states.values()] + [0])
        per_rank = max(1, self.config.transfer_batch_bytes // max(1, self._expert_bytes))
        out = await push(self._fanout, self.placement, new, epoch, self.config, per_rank,
                         before_commit=lambda: self._save(pending=new),
                         progress=lambda i, n: self.swap_progress(epoch, i, n))
        rec.update(out)
        if rec.get("budget_slots"):
            rec["budget_used"] = rec["moved"] / rec["budget_slots"]
        self._phase_s["prepare"] = out.get("prepare_s", 0.0)
        if out["action"] == "no_change":
            rec["epoch"] = self.placement.epoch
            return self._record(rec)
        if out["action"] == "failed":
            return await self._abort(rec, epoch, out["phase"], out["failures"])
        t0 = time.monotonic()
        old = self.placement
        await self._publish(new)
        self._save()  # committed
        self._worker_maps = {r: tuple(new.map_id()) for r in self._worker_maps}  # every rank acked the commit
        self._retired[old.epoch] = time.monotonic()
        self._timed("publish", t0)
        swap_s = time.monotonic() - t_swap
        self._rebalances += 1
        self._moved += out["moved"]
        self._bytes += out["bytes_moved"]
        self._batches += out["batches"]
        self.metrics.count("eplb_rebalances_total")
        self.metrics.count("eplb_experts_moved_total", out["moved"])
        self.metrics.count("eplb_bytes_moved_total", out["bytes_moved"])
        self.metrics.gauge("eplb_swap_batches", out["batches"])
        self.metrics.gauge("eplb_swap_seconds", swap_s)
        self.metrics.gauge("eplb_epoch", epoch)
        rec.update(action="committed", swap_s=swap_s)
        log.info("epoch %d committed (%s): %d slots, %d bytes moved in %.2f s", epoch, rec.get("reason", "explicit"),
                 out["moved"], out["bytes_moved"], swap_s)
        return self._record(rec)

    async def _abort(self, rec: dict, epoch: int, phase: str, failures: dict) -> dict:
        _, abort_failures = await self._fanout("abort", [(epoch,)] * len(self.workers), self.config.abort_timeout_s)
        if phase == "commit":
            self._save()  # the pending map is void: the committed one stays
        self._aborts += 1
        log.warning("epoch %d aborted in %s: %s", epoch, phase, failures)
        self.metrics.count("eplb_aborts_total")
        rec.update(action="aborted", phase=phase, failures={int(k): v for k, v in failures.items()})
        if abort_failures:
            rec["abort_failures"] = abort_failures
        self._errors.append(f"epoch {epoch} aborted in {phase}: {failures}")
        return self._record(rec)

    def _record(self, rec: dict) -> dict:
        self._history.append(rec)
        del self._history[:-1000]
        return rec

    def _fail(self, rec: dict, phase: str, exc: BaseException) -> dict:
        msg = f"{phase} failed: {type(exc).__name__}: {exc}"
        log.warning(msg)
        self._errors.append(msg)
        rec.update(action="error", phase=phase, error=msg)
        return rec

    # ------------------------------------------------------------------ the API
    async def rebalance_now(self, fresh: bool = False) -> dict:
        """Collect, solve on the forecast and push now, whatever the trigger and gain say
        (``fresh``: a from-scratch solve, ignoring the move budget and hysteresis)."""
        return await self.step(force=True, fresh=fresh)

    async def reconfigure(self, **changes: Any) -> dict:
        """Change configuration fields at runtime (e.g. ``max_moves=0.1``); validated as a whole
        (``ValueError`` names bad values, and nothing changes). A new ``forecast`` spec starts its
        forecaster afresh. Returns the new configuration."""
        cfg = ControllerConfig.model_validate({**self.config.model_dump(), **changes})
        self.load.reconfigure(cfg.window, cfg.forecast)
        self.config, self._loop.interval_s = cfg, cfg.interval_s
        return cfg.model_dump()

    async def apply_placement(self, phy2log: torch.Tensor) -> dict:
        """Push an explicit placement ``phy2log [L, R]`` (operators, benchmarks)."""
        lock, _ = self._sync()
        async with lock:
            await self._ready()
            return await self.apply(Placement.from_phy2log(self.topology, phy2log))

    async def _status_fields(self) -> dict:
        """The raw fields :meth:`~ray_eplb.controller.operations.Operations.status` types (no map:
        that is :meth:`current_map`)."""
        await self._ready()
        window = self.window_load()
        return {
            "epoch": self.placement.epoch,
            "digest": self.placement.digest(),
            "recovery": self._recovery,
            "next_epoch": self._next_epoch,
            "started": self.started,
            "balancedness_now": self._balancedness(self.placement, window),
            "balancedness_forecast": None if self.forecast is None else self._balancedness(self.placement, self.forecast),
            "rounds": self._rounds,
            "rebalances": self._rebalances,
            "aborts": self._aborts,
            "experts_moved": self._moved,
            "bytes_moved": self._bytes,
            "transfer_batches": self._batches,
            "tokens_seen": self.load.tokens,
            "unmapped_tokens": self.load.unmapped,
            "phase_seconds": dict(self._phase_s),
            "routers": {k: v[0] for k, v in self._routers.items()},
            "retired_epochs": sorted(self._retired),
            "loop": self._loop.state,
            "errors": list(self._errors),
            "config": self.config.model_dump(),
        }

    async def history(self) -> list[dict]:
        return list(self._history)

    async def measure_telemetry(self, rounds: int = 20) -> dict:
        """Median ms of a no-op fan-out (``ping``) and of a telemetry round, interleaved."""
        if rounds <= 0:
            raise ValueError(f"rounds={rounds} must be positive")
        noop, tele = [], []
        for _ in range(rounds):
            t0 = time.perf_counter()
            await self._fanout("ping", [()] * len(self.workers), self.config.collect_timeout_s)
            noop.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await self.telemetry()
            tele.append(time.perf_counter() - t0)
        med = lambda xs: 1e3 * sorted(xs)[len(xs) // 2]  # noqa: E731
        return {"noop_ms": med(noop), "telemetry_ms": med(tele), "ratio": med(tele) / med(noop)}

    # ------------------------------------------------------------------ the loop
    async def start(self) -> str:
        """Start the control loop (``step()`` every ``interval_s``) as a background task (idempotent).
        The intent is stored: a controller Ray restarts runs its loop again (:meth:`resume`)."""
        await self._ready()
        self._loop_intent = "running"
        self._save()
        return await self._loop.start()

    async def stop(self) -> str:
        """Stop the loop after the current step (the actor stays up for status/history); stored,
        so a restarted controller stays stopped."""
        await self._ready()
        self._loop_intent = "stopped"
        self._save()
        return await self._loop.stop()

    async def resume(self) -> str:
        """After a restart: recover from the store and run the loop again if it was running."""
        await self._ready()
        if self._loop_intent == "running":
            log.info("restarted controller: resuming the control loop")
            return await self._loop.start()
        return self._loop.state
