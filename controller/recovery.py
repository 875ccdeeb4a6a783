"""The controller's durable state and how it heals: persisting each epoch through the balancer's
store, recovering from it after a restart, and bringing a worker that serves another map back onto
the map in force. A mixin of :class:`~ray_eplb.controller.balancer.EplbController`.

The rules it keeps:

- **An epoch names one map for the life of the deployment.** An epoch number is allocated, and the
  store's ``next_epoch`` moved past it, before any worker sees it; a restarted controller starts
  numbering from there (and above anything a worker reports), so no number is used twice.
- **Commit through the store.** Once every rank has prepared epoch ``e``, the store records ``e`` as
  *pending*; once every rank has committed, as *committed*. A controller restarted with a pending
  map rolls it forward (some ranks may already serve it) and heals the others onto it.
- **No component waits for another.** A restarted worker loads the committed map from the store by
  itself; a restarted controller reads the store and is ready at once. Whoever is not on the map
  in force (a worker restarted mid-round, one restarted before a commit reached the store, one
  that could not read the store) is brought onto it by the controller's next round: only that
  worker's changed slots move, from peers on the map in force or from the weight source. A worker
  ahead of the controller's epoch (a lost store) makes the controller renumber the map in force
  to a fresh epoch on every rank.

Shapes: ``phy2log [L, R]``, a rank's ``experts [L, S]``, int64.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import torch

from ray_eplb.actors.protocol import Transfer
from ray_eplb.topology import MapId, Placement, Topology

log = logging.getLogger("ray_eplb.controller")


def heal_transfers(target: Placement, rank: int, held: torch.Tensor, peers: dict[int, torch.Tensor]) -> list[Transfer]:
    """The moves that turn ``rank``'s slots ``held [L, S]`` into ``target``'s.

    Each changed slot is copied from another slot of ``rank`` that holds the expert, else fetched
    from a peer in ``peers`` (``{rank: experts [L, S]}``, ranks known to serve ``target``), else
    loaded from the weight source (``src_rank = -1``)."""
    s = target.topology.slots_per_gpu
    want = target.rank_experts(rank)  # [L, S]
    rows = []
    for layer, j in (held != want).nonzero().tolist():
        e = int(want[layer, j])
        if bool((held[layer] == e).any()):
            src = rank
        else:
            src = next((p for p, ex in sorted(peers.items()) if p != rank and bool((ex[layer] == e).any())), -1)
        rows.append(Transfer(layer, e, src, rank, rank * s + j))
    return rows


def placement_from_record(topology: Topology, rec: dict) -> Placement:
    """The placement a store record describes (``rec``: ``epoch``, ``digest``, ``phy2log``),
    checked against its digest (``ValueError`` naming the mismatch)."""
    p = Placement.from_phy2log(topology, torch.tensor(rec["phy2log"], dtype=torch.int64), int(rec["epoch"]))
    if p.digest() != rec["digest"]:
        raise ValueError(f"stored map of epoch {rec['epoch']}: digest {rec['digest']} does not match its slots ({p.digest()})")
    return p


def map_record(p: Placement) -> dict:
    return {"epoch": p.epoch, "digest": p.digest(), "phy2log": p.phy2log.tolist()}


class Recovery:
    """Store, recovery and healing for :class:`EplbController` (uses its ``topology``, ``store``,
    ``placement``, ``_placements``, ``_next_epoch``, ``_fanout``, ``config``, ``metrics``)."""

    # ------------------------------------------------------------------ the store
    def _save(self, pending: Placement | None = None) -> None:
        """Write the committed map, ``pending`` (or none), the next epoch and the loop intent."""
        rec = {"topology": self.topology.model_dump(), **map_record(self.placement),
               "pending": None if pending is None else map_record(pending),
               "next_epoch": self._next_epoch, "loop": self._loop_intent}
        self.store.save(rec)

    def _allocate_epoch(self) -> int:
        """A fresh epoch number, made durable before any worker sees it."""
        epoch = self._next_epoch
        self._next_epoch += 1
        self._save()
        return epoch

    async def recover(self) -> bool:
        """Take the committed map from the store (after a restart), or, on a fresh start or with
        an empty store, the placement given (recorded as committed). A pending map in the store
        means the last commit was cut short: it is rolled forward. Never waits for a worker."""
        try:
            stored = self.store.load()
            rec = None if self._fresh_start else stored
            if self._fresh_start and stored is not None:  # a new deployment never reuses an earlier one's numbers
                self._next_epoch = max(self._next_epoch, int(stored.get("next_epoch", 0)))
            if rec is not None and Topology.model_validate(rec["topology"]) != self.topology:
                raise ValueError(f"the store holds a map for another topology: {rec['topology']}")
            if rec is None:
                self._save()
                self._recovery = "fresh"
            else:
                committed = placement_from_record(self.topology, rec)
                pending = rec.get("pending")
                self.placement = placement_from_record(self.topology, pending) if pending else committed
                # Traffic is still routed by the committed map until every rank is on the pending one:
                # its placement stays known, or the telemetry counted under it would be left unmapped.
                self._placements = {committed.epoch: committed, self.placement.epoch: self.placement}
                self._next_epoch = max(self._next_epoch, int(rec.get("next_epoch", 0)), self.placement.epoch + 1)
                self._loop_intent = rec.get("loop", "idle")
                self._recovery = f"restored epoch {self.placement.epoch}" + (" (rolled forward)" if pending else "")
                self._save()
        except Exception as exc:  # noqa: BLE001 - reported; the next call tries again
            self._recovery = f"store unavailable: {type(exc).__name__}: {exc}"
            self._errors.append(self._recovery)
            log.error("recovery failed: %s", self._recovery)
            return False
        self._fresh_start = False
        self._recovered = True
        log.info("controller ready on epoch %d (%s), next epoch %d", self.placement.epoch, self._recovery, self._next_epoch)
        return True

    async def _ready(self) -> bool:
        """Recovered already, or :meth:`recover` now (every entry point calls this first)."""
        return self._recovered or await self.recover()

    # ------------------------------------------------------------------ healing
    def _off_map(self, reports: dict[int, dict]) -> dict[int, MapId]:
        """Ranks whose ``collect`` reply says they serve another map than the one in force."""
        want = self.placement.map_id()
        for res in reports.values():  # numbers a worker has seen are used up
            self._next_epoch = max(self._next_epoch, int(res.get("epoch", -1)) + 1)
        return {r: MapId(int(res["epoch"]), res.get("digest")) for r, res in reports.items()
                if (int(res["epoch"]), res.get("digest")) != want}

    async def _heal(self, off: dict[int, MapId]) -> dict:
        """Bring the ranks in ``off`` onto the map in force (see the module docstring)."""
        t0 = time.monotonic()
        target = self.placement
        renumber = any(mid.epoch >= target.epoch for mid in off.values())
        states, failures = await self._fanout("state", [()] * len(self.workers), self.config.collect_timeout_s)
        if failures:
            return {"action": "heal_skipped", "ranks": sorted(off), "why": f"no state from ranks {sorted(failures)}"}
        renumber = renumber or any(states[r]["max_aborted"] >= target.epoch for r in off)
        if renumber:
            target = target.with_epoch(self._allocate_epoch())
        ranks = sorted(range(len(self.workers)) if renumber else off)
        peers = {r: st["experts"] for r, st in states.items() if r not in off}
        digest = target.digest()
        args = {r: (target.epoch, heal_transfers(target, r, states[r]["experts"], peers), target.rank_experts(r).clone(),
                    self.config.prepare_timeout_s, True, digest) for r in ranks}
        rec: dict[str, Any] = {"action": "healed", "epoch": target.epoch, "ranks": sorted(off), "renumbered": renumber,
                               "from": {r: list(mid) for r, mid in off.items()},
                               "moved": sum(len(a[1]) for a in args.values())}
        results, failures = await self._fanout("prepare", args, self.config.prepare_timeout_s)
        failures.update({r: str(res) for r, res in results.items() if res.get("status") != "prepared"})
        if not failures:
            if renumber:
                self._save(pending=target)
            results, failures = await self._fanout("commit", {r: (target.epoch,) for r in ranks}, self.config.commit_timeout_s)
            failures.update({r: str(res) for r, res in results.items() if res.get("status") != "committed"})
        if failures:
            await self._fanout("abort", {r: (target.epoch,) for r in ranks}, self.config.abort_timeout_s)
            if renumber:
                self._save()
            rec.update(action="heal_failed", failures=failures)
            self._errors.append(f"healing ranks {sorted(off)} onto epoch {target.epoch} failed: {failures}")
            log.warning("healing ranks %s onto epoch %d failed: %s", sorted(off), target.epoch, failures)
            return rec
        if renumber:
            old = self.placement
            await self._publish(target)
            self._retired[old.epoch] = time.monotonic()
            self._save()
            self.metrics.gauge("eplb_epoch", target.epoch)
        self._worker_maps.update({r: tuple(target.map_id()) for r in ranks})
        self.metrics.count("eplb_heals_total")
        rec["heal_s"] = time.monotonic() - t0
        log.info("healed ranks %s onto epoch %d (%d slots moved%s)", sorted(off), target.epoch, rec["moved"],
                 ", renumbered" if renumber else "")
        return rec
