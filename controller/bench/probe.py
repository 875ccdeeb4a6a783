"""The runtime benchmark's worker: :class:`RayExpertWorker` plus the calls that measure transfers
against a plain object-store read of the same bytes (the bandwidth baseline). Launched with
``launch_workers(..., worker_cls=ProbeWorker)``; the production worker carries none of this."""
from __future__ import annotations

import time
from typing import Any

import ray
import torch

from ray_eplb.actors.ray_worker import RayExpertWorker


class ProbeWorker(RayExpertWorker):
    """A worker that can also time fetches from a peer (see :meth:`time_fetch`)."""

    def make_blob(self, nbytes: int) -> int:
        self._blob = torch.ones(max(1, nbytes // 4), dtype=torch.float32)
        return int(self._blob.numel() * 4)

    def blob(self, as_numpy: bool = False) -> Any:
        return self._blob.numpy() if as_numpy else self._blob

    def time_fetch(self, src_rank: int, items: list[tuple[int, int]], mode: str) -> float:
        """Seconds to pull bytes from ``src_rank``: ``experts`` the way ``prepare`` does (one export
        reply, zero-copy receive, kept as it is: :meth:`Staging.borrow`, its cap aside),
        ``experts_copy`` the same copied into staging buffers (what a worker past its borrow cap
        does), ``get`` a plain ``ray.get`` of the source's blob, ``get_copy`` that plus one copy
        into fresh memory, ``get_numpy`` a plain ``ray.get`` of the blob as a numpy array."""
        t0 = time.perf_counter()
        if mode in ("experts", "experts_copy"):
            reply = self.fetcher({src_rank: items}, 60.0)[src_rank]
            if mode == "experts_copy" or not self.staging.borrow(reply, self.fetcher.zero_copy, capped=False):
                reply = [self.staging.own(w, copy=True) for w in reply]
            elapsed = time.perf_counter() - t0
            if mode == "experts_copy":
                with self._lock:  # a benchmark: give the staging buffers back
                    self.staging.pool.extend(reply)
            return elapsed
        elif mode in ("get", "get_copy", "get_numpy"):
            blob = ray.get(self.fetcher.handle(src_rank).blob.remote(mode == "get_numpy"))
            if mode == "get_copy":
                torch.empty_like(blob).copy_(blob)
        else:
            raise ValueError(f"mode={mode!r} must be experts, experts_copy, get, get_copy or get_numpy")
        return time.perf_counter() - t0
