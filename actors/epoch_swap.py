"""The epoch swap of an expert worker: a mixin of :class:`~ray_eplb.actors.worker.ExpertWorker`
(plain Python, no Ray), kept apart from serving so each reads on its own.

Swap protocol (two-phase, epoch-versioned, zero-stall):

- ``prepare(epoch, transfers, experts)`` builds the table of ``epoch`` off to the side: unchanged
  slots are shared, changed slots come from this worker (another of its slots holds the expert),
  from a peer worker (through :class:`Fetcher`) or from the :class:`WeightSource`. Dispatches keep
  being served from the active table meanwhile. The transfers may come in batches: calls with
  ``seal=False`` add theirs to the table under construction, the ``seal=True`` call adds the last
  ones and checks every changed slot was staged; only a sealed table can be committed.
- ``commit(epoch)`` makes the staged table the active one. The previous table is *retired*: it keeps
  serving dispatches tagged with its epoch until ``release(epoch)`` says no router routes with it any
  more *and* no dispatch of it is in flight; then its buffers are dropped.
- ``abort(epoch)`` drops a staged table, or rolls a committed-but-unpublished epoch back.
- Every call is idempotent; calls for an epoch older than the worker's state are answered
  ``"stale"`` and change nothing.

State it uses, all owned by the worker and guarded by ``self._lock`` unless said otherwise:
``epoch``, ``_tables`` (epoch -> :class:`Table`), ``_staged`` (a sealed table), ``_partial`` (one
under construction; ``_stage_lock`` serialises its batches), ``_max_aborted``, ``_counts``,
``staging`` (:class:`~ray_eplb.actors.staging.Staging`), ``stats``, ``source``, ``fetcher``.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ray_eplb.actors.protocol import Transfer
from ray_eplb.actors.tables import Partial, check_rows


class EpochSwap:
    """``prepare`` / ``commit`` / ``abort`` / ``release`` and the peer side, ``export``."""

    def export(self, items: Sequence[tuple[int, int]], epoch: int | None = None) -> list[torch.Tensor]:
        """Packed weights ``[3, I, H]`` (cpu) of ``(layer, expert)`` pairs this worker holds, for a
        peer, as they are (no stacking copy; the Ray worker sends them as
        :func:`~ray_eplb.actors.protocol.pack_reply` pieces)."""
        with self._lock:
            table = self._tables[self.epoch if epoch is None else epoch]
        out = []
        for layer, expert in items:
            hits = (table.experts[layer] == expert).nonzero()
            if hits.numel() == 0:
                raise ValueError(f"worker {self.rank} does not hold expert {expert} of layer {layer}")
            out.append(table.weights[layer][int(hits[0])])
        return [w.cpu() for w in out]

    def prepare(self, epoch: int, transfers: Sequence[Transfer], experts: torch.Tensor, timeout_s: float = 60.0,
                seal: bool = True, digest: str | None = None) -> dict:
        """Stage (part of) the table of ``epoch``: ``experts [L, S]`` is this rank's new slot map and
        ``transfers`` moves whose ``dst_rank`` is this rank (at most one per changed slot);
        ``digest`` names the whole new map (:meth:`Placement.digest`): dispatches of ``epoch`` are
        served only if they carry it.

        ``seal=False`` stages one batch and answers ``"staged"``; the ``seal=True`` call stages its
        own rows, checks every changed slot has been staged by some call of this epoch and answers
        ``"prepared"`` (one call with every row and ``seal=True`` does it all at once). A row staged
        already is skipped, so a repeated call changes nothing. Replies carry ``moved`` (slots
        staged by this call) and ``bytes`` (weight bytes it fetched from peers or loaded).

        Runs on the staging thread (see ``stage_nice``), paced by ``stage_duty``, so serving keeps the CPU."""
        self._fault("prepare")
        return self.staging.run(self._prepare, epoch, transfers, experts, timeout_s, seal, digest)

    def _prepare(self, epoch: int, transfers: Sequence[Transfer], experts: torch.Tensor, timeout_s: float,
                 seal: bool, digest: str | None) -> dict:
        experts = torch.as_tensor(experts, dtype=torch.int64).cpu()
        with self._stage_lock:
            with self._lock:
                if tuple(experts.shape) != tuple(self._tables[self.epoch].experts.shape):
                    raise ValueError(f"experts has shape {tuple(experts.shape)}, want {tuple(self._tables[self.epoch].experts.shape)}")
                verdict = self._check_new_epoch(epoch)
                if verdict:
                    return verdict
                part = self._begin(epoch, experts, digest)
                if part is None:
                    return self._stale(epoch)
            s = self.topology.slots_per_gpu
            rows = check_rows(self.rank, s, part, transfers)
            missing = part.missing(rows, self.rank, s) if seal else []
            if missing:
                with self._lock:
                    self._drop_partial(part)
                raise ValueError(f"worker {self.rank}: changed slots {missing[:4]} have no transfer")
            try:
                ok, nbytes = self.staging.fill(
                    self.rank, s, part.base, part.weights, rows, self.source,
                    self.fetcher, lambda: self._aborted(epoch), timeout_s, rest_after=not seal,
                )
            except BaseException:
                with self._lock:
                    self._drop_partial(part)
                raise
            with self._lock:
                if not ok or self._check_new_epoch(epoch) or self._partial is not part:
                    self._drop_partial(part)  # an abort (or a newer epoch) arrived while we staged
                    return self._stale(epoch)
                part.done.update((t.layer, t.dst_slot - self.rank * s) for t in rows)
                self.stats.moved += len(rows)
                reply = {"rank": self.rank, "epoch": epoch, "moved": len(rows), "bytes": nbytes}
                if not seal:
                    return {"status": "staged", **reply}
                self._partial = None
                replaced, self._staged = self._staged, part.as_table()
                if replaced is not None:  # a newer epoch supersedes an older staging
                    self._recycle([replaced])
            return {"status": "prepared", **reply}

    def _begin(self, epoch: int, experts: torch.Tensor, digest: str | None) -> Partial | None:
        """Under the lock: the table under construction for ``epoch`` (started on the active table
        if this is the epoch's first batch), or ``None`` when a newer epoch is under construction."""
        part = self._partial
        if part is not None and part.epoch > epoch:
            return None
        if part is not None and part.epoch < epoch:  # an older round that never finished
            self._drop_partial(part)
            part = None
        if part is None:
            part = self._partial = Partial.start(epoch, experts, self._tables[self.epoch], digest)
        elif not torch.equal(part.experts, experts) or part.digest != digest:
            raise ValueError(f"worker {self.rank}: batches of epoch {epoch} disagree on the new slot map")
        return part

    def _aborted(self, epoch: int) -> bool:
        with self._lock:
            return epoch <= self._max_aborted
    def _stale(self, epoch: int) -> dict:
        return {"status": "stale", "rank": self.rank, "epoch": epoch, "active": self.epoch}

    def _drop_partial(self, part: Partial) -> None:
        """Under the lock: give the buffers of an abandoned construction back to the pool."""
        if self._partial is part:
            self._partial = None
        self._recycle([part.as_table()])

    def _check_new_epoch(self, epoch: int) -> dict | None:
        """Under the lock: why ``epoch`` must not be staged now (or ``None`` if it may)."""
        if epoch <= self.epoch or epoch <= self._max_aborted:
            return {"status": "stale", "rank": self.rank, "epoch": epoch, "active": self.epoch}
        if self._staged is not None and self._staged.epoch == epoch:
            return {"status": "prepared", "rank": self.rank, "epoch": epoch, "duplicate": True}
        if self._staged is not None and self._staged.epoch > epoch:
            return {"status": "stale", "rank": self.rank, "epoch": epoch, "active": self.epoch}
        return None

    def commit(self, epoch: int) -> dict:
        """Activate the staged table of ``epoch``. Committing the active epoch again is a no-op."""
        self._fault("commit")
        with self._lock:
            if epoch == self.epoch:
                return {"status": "committed", "rank": self.rank, "epoch": epoch, "duplicate": True}
            if epoch < self.epoch or epoch <= self._max_aborted:
                return {"status": "stale", "rank": self.rank, "epoch": epoch, "active": self.epoch}
            if self._staged is None or self._staged.epoch != epoch:
                return {"status": "not_prepared", "rank": self.rank, "epoch": epoch, "active": self.epoch}
            self._tables[epoch] = self._staged
            self._staged = None
            self.epoch = epoch
            self._counts[epoch] = torch.zeros_like(self._tables[epoch].experts)
            for old in sorted(self._counts)[: -self.keep_count_epochs]:
                del self._counts[old]
            return {"status": "committed", "rank": self.rank, "epoch": epoch}

    def abort(self, epoch: int) -> dict:
        """Drop the staging of ``epoch``, or roll back a committed ``epoch`` to the previous table."""
        with self._lock:
            self._max_aborted = max(self._max_aborted, epoch)
            if self._partial is not None and self._partial.epoch <= epoch:
                part, self._partial = self._partial, None
                # A staging call still filling it recycles it itself when it sees it detached (its
                # buffers must not enter the pool twice, nor while it still writes them).
                if self._stage_lock.acquire(blocking=False):
                    try:
                        self._recycle([part.as_table()])
                    finally:
                        self._stage_lock.release()
                if self._staged is None or self._staged.epoch > epoch:
                    return {"status": "aborted", "rank": self.rank, "epoch": epoch}
            if self._staged is not None and self._staged.epoch <= epoch:
                staged, self._staged = self._staged, None
                self._recycle([staged])
                return {"status": "aborted", "rank": self.rank, "epoch": epoch}
            if epoch == self.epoch:
                older = [e for e in self._tables if e < epoch]
                if not older:
                    return {"status": "cannot_roll_back", "rank": self.rank, "epoch": epoch}
                prev = max(older)
                self._tables[prev].releasable = False
                self.epoch = prev
                self._tables[epoch].releasable = True
                self._drop_released()
                return {"status": "rolled_back", "rank": self.rank, "epoch": epoch, "active": prev}
            return {"status": "nothing_to_abort", "rank": self.rank, "epoch": epoch}

    def release(self, epoch: int) -> dict:
        """No router routes with epochs ``<= epoch`` any more: free their retired tables once idle."""
        with self._lock:
            for e, t in self._tables.items():
                if e <= epoch and e != self.epoch:
                    t.releasable = True
            freed = self._drop_released()
            in_use, held = self._weights_in_use(), sorted(self._tables)
        self._release_store_pages(in_use)  # outside the lock: serving never waits on the unmapping
        return {"status": "released", "rank": self.rank, "freed": freed, "held": held}

    def _drop_released(self) -> list[int]:
        gone = [e for e, t in self._tables.items() if t.releasable and t.in_flight == 0 and e != self.epoch]
        dropped = [self._tables.pop(e) for e in gone]
        if dropped:
            self._recycle(dropped)
        return gone

