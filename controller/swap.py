"""The two-phase push of one new placement, as a plain async function over a fan-out callable.

:func:`push` plans the transfers (:func:`~ray_eplb.controller.transfer.transfer_plan`), groups them
into batches (:func:`~ray_eplb.controller.transfer.batch_transfers`: no rank sends or receives more
than ``per_rank`` experts per batch: ``config.transfer_batch_bytes`` worth), stages the batches one after the other on the
workers (``prepare(..., seal=False)``; the last batch goes to every rank with ``seal=True``), and
commits on every rank. Serving goes on meanwhile: workers serve their active table until commit.
The commit stays atomic per epoch: on any failure the caller aborts the epoch on every worker.

``fanout(method, {rank: args}, timeout_s)`` -> ``({rank: reply}, {rank: why it failed})``.
"""
from __future__ import annotations

import time
from typing import Any, Awaitable, Callable

from ray_eplb.controller.config import ControllerConfig
from ray_eplb.controller.transfer import batch_transfers, plan_summary, split_by_rank, transfer_plan
from ray_eplb.topology import Placement

Fanout = Callable[[str, dict, float], Awaitable[tuple[dict, dict]]]


async def push(fanout: Fanout, old: Placement, new: Placement, epoch: int, config: ControllerConfig,
               per_rank: int = 1, before_commit: Callable[[], None] | None = None,
               progress: Callable[[int, int], None] | None = None) -> dict:
    """Move the workers from ``old`` to ``new`` (already numbered ``epoch``), in batches where no
    rank sends or receives more than ``per_rank`` experts; ``before_commit()`` runs once every
    rank has prepared (the controller records the map as pending in its store there);
    ``progress(i, n)`` after batch ``i`` of ``n`` (from 1) is staged.

    Returns a record: ``transfers`` (plan summary), ``moved`` (slots), ``batches``, ``batch_sizes``,
    ``bytes_moved`` (weight bytes the workers fetched or loaded), ``prepare_s``, and ``action``:
    ``no_change`` (nothing to move), ``committed``, or ``failed`` with ``phase`` (``prepare`` |
    ``commit``) and ``failures`` ``{rank: why}`` (``-1``: the whole phase); the caller aborts then.
    """
    topo = new.topology
    moves = transfer_plan(old, new)
    batches = batch_transfers(moves, per_rank)
    rec: dict[str, Any] = {
        "transfers": plan_summary(moves, topo), "moved": len(moves), "batches": len(batches),
        "batch_sizes": [len(b) for b in batches], "bytes_moved": 0,
    }
    if not moves:
        return {**rec, "action": "no_change"}
    t0 = time.monotonic()
    deadline = t0 + config.prepare_timeout_s
    experts = [new.rank_experts(r).clone() for r in range(topo.num_gpus)]  # [L, S] each
    digest = new.digest()
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        per_rank = split_by_rank(batch, topo.num_gpus)
        # Middle batches go to the ranks that receive in them; the last one seals every rank's table.
        ranks = range(topo.num_gpus) if last else [r for r in range(topo.num_gpus) if per_rank[r]]
        left = deadline - time.monotonic()
        if left <= 0:
            return {**rec, "action": "failed", "phase": "prepare", "prepare_s": time.monotonic() - t0,
                    "failures": {-1: f"prepare deadline ({config.prepare_timeout_s:g} s) passed before batch {i}"}}
        try:
            args = {r: (epoch, per_rank[r], experts[r], left, last, digest) for r in ranks}
            results, failures = await fanout("prepare", args, left)
        except Exception as exc:  # noqa: BLE001 - reported, the caller aborts
            results, failures = {}, {-1: repr(exc)}
        ok = ("prepared",) if last else ("staged", "prepared")
        failures.update({r: str(res) for r, res in results.items() if res.get("status") not in ok})
        rec["bytes_moved"] += sum(int(res.get("bytes", 0)) for res in results.values())
        if failures:
            return {**rec, "action": "failed", "phase": "prepare", "failures": failures,
                    "failed_batch": i, "prepare_s": time.monotonic() - t0}
        if progress is not None:
            progress(i + 1, len(batches))
    rec["prepare_s"] = time.monotonic() - t0
    if before_commit is not None:
        before_commit()
    results, failures = await fanout("commit", {r: (epoch,) for r in range(topo.num_gpus)}, config.commit_timeout_s)
    failures.update({r: str(res) for r, res in results.items() if res.get("status") != "committed"})
    if failures:
        return {**rec, "action": "failed", "phase": "commit", "failures": failures}
    return {**rec, "action": "committed"}
