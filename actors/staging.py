"""Where a worker stages a swap: pooled weight buffers, low-priority staging threads, paced fetches.

Three measured facts shape it (2-core VM, see ``ray-eplb bench-runtime``):

- A fresh allocation costs ~10x a copy into memory already touched (page faults are expensive on
  VMs), so received weights are copied into a pool of pre-touched buffers, and buffers of released
  tables go back to the pool. A GPU needs its staging memory reserved up front anyway.
- A swap that moves weights as fast as it can takes the CPU (or, on GPUs, the links) serving
  needs, so weights move in chunks with rests between them (``duty``).
- Optionally (``nice``), staging runs on a thread of lowered OS priority.
"""
from __future__ import annotations

import os
import threading
import time
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
    """

    def __init__(self, device: torch.device, lock: threading.Lock, nice: int | None = None,
                 duty: float = 0.25, chunk_bytes: int = 8 * 2**20, name: str = "eplb"):
        if not 0 < duty <= 1:
            raise ValueError(f"stage_duty={duty} must lie in (0, 1]")
        if chunk_bytes <= 0:
            raise ValueError(f"stage_chunk_bytes={chunk_bytes} must be positive")
        self.device, self.lock, self.nice, self.duty, self.chunk_bytes = device, lock, nice, duty, chunk_bytes
        self.name = name
        self.pool: list[torch.Tensor] = []  # free packed [3, I, H] buffers
        self._thread: ThreadPoolExecutor | None = None
        self.fetched_bytes = 0
        self.fetch_s = 0.0

    def prewarm(self, like: torch.Tensor, count: int) -> None:
        """Add ``count`` buffers shaped like ``like``; zeros, so their pages are touched now."""
        self.pool += [torch.zeros_like(like, device=self.device) for _ in range(count)]

    def own(self, w: torch.Tensor, copy: bool = False) -> torch.Tensor:
        """``w`` on the device in memory of the worker's own: copied into a pooled buffer when one
        fits (``copy``: ``w`` must not be kept, e.g. a read-only zero-copy view of the object store)."""
        if not (copy or w.device != self.device or not w.is_contiguous() or _read_only(w)):
            return w
        with self.lock:
            buf = self.pool.pop() if self.pool else None
        if buf is None or buf.shape != w.shape or buf.dtype != w.dtype:
            return w.to(self.device, copy=True)
        return buf.copy_(w, non_blocking=self.device.type == "cuda")

    def recycle(self, tensors: Iterable[torch.Tensor], live: set[int]) -> None:
        """Caller holds the lock: return ``tensors`` whose ``id`` is not in ``live`` to the pool (once each)."""
        seen: set[int] = set()
        for w in tensors:
            if id(w) not in live and id(w) not in seen:
                seen.add(id(w))
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
        for start in range(0, len(remote), per_chunk):
            chunk = remote[start : start + per_chunk]
            t0 = time.perf_counter()
            requests: dict[int, list[Transfer]] = defaultdict(list)
            for t in chunk:
                requests[t.src_rank].append(t)
            got = fetcher({r: [(t.layer, t.expert) for t in ts] for r, ts in requests.items()},
                          max(0.1, deadline - time.monotonic()))
            for r, ts in requests.items():
                for t, w in zip(ts, got[r], strict=True):
                    place(t, self.own(w, copy=True))
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


def _read_only(t: torch.Tensor) -> bool:
    """True for tensors backed by read-only memory (zero-copy tensors from Ray's object store)."""
    try:
        return not t.numpy().flags.writeable
    except (RuntimeError, TypeError):
        return False
