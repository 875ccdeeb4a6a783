"""Where a worker stages a swap: borrowed object-store replies, pooled weight buffers,
low-priority staging threads, paced fetches.

Four measured facts shape it (Ray 2.60 on a 2-core CPU machine, see ``ray-eplb bench-runtime``):

- Copying a received expert into memory of the worker's own halves the transfer bandwidth: a plain
  ``ray.get`` of zero-copy tensors only maps the object store. So a CPU worker *borrows* what a peer
  sent (the weights stay in the object store, read-only, pinned while any of its tensors serves)
  up to ``borrow_bytes`` of object-store memory; beyond that, or on a GPU, it copies.
- A fresh allocation costs ~10x a copy into memory already touched (page faults are expensive on
  VMs), so copied weights go into a pool of pre-touched buffers, and buffers of released tables go
  back to the pool (up to the number pre-touched). A GPU needs its staging memory reserved anyway.
- A swap that moves weights as fast as it can takes the CPU (or, on GPUs, the links) serving
  needs, so weights move in chunks with rests between them (``duty``).
- Optionally (``nice``), staging runs on a thread of lowered OS priority.
"""
from __future__ import annotations

import os
import threading
import time
import weakref
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable

import torch

from ray_eplb.actors.protocol import Fetcher, Transfer


class Staging:
    """Staging buffers and threads of one worker.

    Args:
        device: the worker's device.
        lock: the worker's state lock (the pool is shared with table bookkeeping).
        nice: lower the staging threads' OS priority by this much (``None``: run in the caller's thread).
        duty: fraction of the time a staging may keep busy (1.0: as fast as possible).
        chunk_bytes: bytes moved per chunk of a paced fetch.
        borrow_bytes: object-store bytes this worker may keep mapped as weights (``0``: copy all).
    """

    def __init__(self, device: torch.device, lock: threading.Lock, nice: int | None = None,
                 duty: float = 0.25, chunk_bytes: int = 8 * 2**20, name: str = "eplb", borrow_bytes: int = 0):
        if not 0 < duty <= 1:
            raise ValueError(f"stage_duty={duty} must lie in (0, 1]")
        if chunk_bytes <= 0:
            raise ValueError(f"stage_chunk_bytes={chunk_bytes} must be positive")
        if borrow_bytes < 0:
            raise ValueError(f"stage_borrow_bytes={borrow_bytes} must be >= 0")
        self.device, self.lock, self.nice, self.duty, self.chunk_bytes = device, lock, nice, duty, chunk_bytes
        self.name, self.borrow_bytes = name, borrow_bytes
        self.pool: list[torch.Tensor] = []  # free packed [3, I, H] buffers
        self.pool_cap = 0  # buffers the pool keeps: as many as were pre-touched
        self._replies: list[_Reply] = []  # borrowed replies, some maybe released already
        self._replies_lock = threading.Lock()  # staging borrows while state() reads the total
        self._thread: ThreadPoolExecutor | None = None
        self.fetched_bytes = 0
        self.borrowed_total = 0  # of fetched_bytes, those kept in the object store (not copied)
        self.fetch_s = 0.0

    def prewarm(self, like: torch.Tensor, count: int) -> None:
        """Add ``count`` buffers shaped like ``like``; zeros, so their pages are touched now."""
        self.pool += [torch.zeros_like(like, device=self.device) for _ in range(count)]
        self.pool_cap += count

    @property
    def borrowed_bytes(self) -> int:
        """Object-store bytes this worker's tables keep pinned now (whole replies: a reply stays
        pinned while any of its tensors is referenced)."""
        with self._replies_lock:
            return self._pinned()

    def _pinned(self) -> int:
        self._replies = [r for r in self._replies if r.alive]
        return sum(r.nbytes for r in self._replies)

    def borrow(self, reply: list[torch.Tensor], zero_copy: bool, capped: bool = True) -> bool:
        """Keep the tensors of ``reply`` (one peer reply: one object-store object) as weights, as
        they are, if ``zero_copy`` (they are immutable views nobody else writes), the device is the
        cpu and the reply fits under ``borrow_bytes`` (``capped=False``: a benchmark of this path
        ignores the cap). Marks them so they never enter the pool."""
        nbytes = sum(w.numel() * w.element_size() for w in reply)
        if not (zero_copy and reply and self.device.type == "cpu"
                and all(w.device.type == "cpu" and w.is_contiguous() for w in reply)):
            return False
        with self._replies_lock:  # (a finalizer only discards from a set: it never takes this lock)
            if capped and self._pinned() + nbytes > self.borrow_bytes:
                return False
            rec = _Reply(nbytes, len(reply))
            for i, w in enumerate(reply):
                w._eplb_borrowed = True  # recycle() must never reuse (write into) object-store memory
                weakref.finalize(w, rec.alive.discard, i)
            self._replies.append(rec)
            self.borrowed_total += nbytes
        return True

    def own(self, w: torch.Tensor, copy: bool = False) -> torch.Tensor:
        """``w`` on the device in memory of the worker's own: copied into a pooled buffer when one
        fits (``copy``: ``w`` must not be kept, e.g. a peer's tensor or a view of the object store)."""
        if not (copy or w.device != self.device or not w.is_contiguous()):
            return w
        with self.lock:
            buf = self.pool.pop() if self.pool else None
        if buf is None or buf.shape != w.shape or buf.dtype != w.dtype:
            return w.to(self.device, copy=True)
        return buf.copy_(w, non_blocking=self.device.type == "cuda")

    def recycle(self, tensors: Iterable[torch.Tensor], live: set[int]) -> None:
        """Caller holds the lock: return ``tensors`` whose ``id`` is not in ``live`` to the pool (once
        each), up to ``pool_cap`` buffers; borrowed ones are dropped (their reply is released once none
        of its tensors is referenced)."""
        seen: set[int] = set()
        for w in tensors:
            if id(w) not in live and id(w) not in seen:
                seen.add(id(w))
                if not getattr(w, "_eplb_borrowed", False) and len(self.pool) < self.pool_cap:
                    self.pool.append(w)

    def run(self, fn: Callable, *args: Any) -> Any:
        """Run ``fn(*args)`` on the staging thread (lowered priority), or inline when ``nice`` is None.

        Only staging runs there; serving a peer's fetch (``export``) runs on Ray's threads and waits
        on nothing, so two workers fetching from each other can never wait on each other."""
        if self.nice is None:
            return fn(*args)
        with self.lock:
            if self._thread is None:
                self._thread = ThreadPoolExecutor(
                    1, thread_name_prefix=f"{self.name}-stage", initializer=_lower_priority, initargs=(self.nice,)
                )
        return self._thread.submit(fn, *args).result()

    def fill(self, rank: int, slots_per_gpu: int, base: Any, weights: list[list[torch.Tensor]],
             rows: list[Transfer], source: Any, fetcher: Fetcher | None, aborted: Callable[[], bool],
             timeout_s: float, rest_after: bool = False) -> tuple[bool, int]:
        """Stage ``rows`` (transfers into ``rank``'s slots) into ``weights [L][S]``: a local copy
        shares the tensor of ``base`` (the active table: ``experts [L, S]``, ``weights [L][S]``;
        weights are never written in place), a ``src_rank`` of ``-1`` (or no ``fetcher``) loads from
        ``source``, anything else is fetched from its peer (paced, see :meth:`fetch_paced`).
        Returns ``(not aborted, bytes fetched or loaded)``."""
        remote: list[Transfer] = []
        nbytes = 0
        for t in rows:
            j = t.dst_slot - rank * slots_per_gpu
            if t.src_rank == rank:
                hits = (base.experts[t.layer] == t.expert).nonzero()
                if hits.numel() == 0:
                    raise ValueError(f"transfer {t}: worker {rank} does not hold expert {t.expert}")
                weights[t.layer][j] = base.weights[t.layer][int(hits[0])]
            elif t.src_rank < 0 or fetcher is None:
                w = weights[t.layer][j] = self.own(source.expert(t.layer, t.expert))
                nbytes += w.numel() * w.element_size()
            else:
                remote.append(t)
        if not remote:
            return True, nbytes

        def place(t: Transfer, w: torch.Tensor) -> None:
            weights[t.layer][t.dst_slot - rank * slots_per_gpu] = w

        ref = base.weights[0][0]
        before = self.fetched_bytes
        ok = self.fetch_paced(fetcher, remote, place, aborted, timeout_s, ref.numel() * ref.element_size(), rest_after)
        return ok, nbytes + self.fetched_bytes - before

    def fetch_paced(self, fetcher: Fetcher, remote: list[Transfer], place: Callable[[Transfer, torch.Tensor], None],
                    aborted: Callable[[], bool], timeout_s: float, expert_bytes: int, rest_after: bool = False) -> bool:
        """Fetch ``remote`` from peers ``chunk_bytes`` at a time, resting between chunks so staging
        keeps busy at most ``duty`` of the time (and after the last one with ``rest_after``: more
        batches of the same swap follow); ``place(t, own_tensor)`` stores each one. Returns False as
        soon as ``aborted()`` says the epoch was aborted meanwhile."""
        per_chunk = max(1, self.chunk_bytes // max(1, expert_bytes))
        deadline = time.monotonic() + timeout_s
        zero_copy = getattr(fetcher, "zero_copy", False)  # its replies may be borrowed (see borrow)
        for start in range(0, len(remote), per_chunk):
            chunk = remote[start : start + per_chunk]
            t0 = time.perf_counter()
            requests: dict[int, list[Transfer]] = defaultdict(list)
            for t in chunk:
                requests[t.src_rank].append(t)
            got = fetcher({r: [(t.layer, t.expert) for t in ts] for r, ts in requests.items()},
                          max(0.1, deadline - time.monotonic()))
            for r, ts in requests.items():
                keep = self.borrow(got[r], zero_copy)
                for t, w in zip(ts, got[r], strict=True):
                    place(t, w if keep else self.own(w, copy=True))
                    self.fetched_bytes += w.numel() * w.element_size()
            dt = time.perf_counter() - t0
            self.fetch_s += dt
            if aborted():
                return False
            if self.duty < 1 and (rest_after or start + per_chunk < len(remote)):
                time.sleep(min(dt * (1 - self.duty) / self.duty, max(0.0, deadline - time.monotonic())))
        return True


def _lower_priority(nice: int) -> None:
    """Lower this thread's OS scheduling priority (Linux schedules threads individually)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (AttributeError, OSError):  # not Linux, or not allowed: stage at normal priority
        pass


class _Reply:
    """A borrowed reply: its ``nbytes`` stay pinned in the object store while ``alive`` (indices of
    its tensors not yet garbage-collected) is not empty."""

    __slots__ = ("nbytes", "alive")

    def __init__(self, nbytes: int, count: int):
        self.nbytes, self.alive = nbytes, set(range(count))
