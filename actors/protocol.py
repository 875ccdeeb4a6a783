"""The swap protocol's shared types: a transfer row, the stale-epoch error, the peer-fetch interface,
the telemetry wire format."""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Protocol, Sequence

import torch


class Transfer(NamedTuple):
    """One expert move of a transfer plan: put ``expert`` of ``layer`` into ``dst_slot`` (a global slot
    id) of ``dst_rank``, fetched from ``src_rank`` (``src_rank == dst_rank``: a local copy; ``-1``: the
    weight source)."""

    layer: int
    expert: int
    src_rank: int
    dst_rank: int
    dst_slot: int


class StaleEpochError(RuntimeError):
    """A dispatch named an epoch this worker does not hold (never committed, or already released)."""

    def __init__(self, rank: int, epoch: int, held: Sequence[int]):
        super().__init__(f"worker {rank}: epoch {epoch} is not served here (held: {sorted(held)})")
        self.rank, self.epoch, self.held = rank, epoch, list(held)

    def __reduce__(self):
        return (StaleEpochError, (self.rank, self.epoch, self.held))


class Fetcher(Protocol):
    """Fetches packed expert weights from peer workers, in parallel over sources."""

    def __call__(self, requests: dict[int, list[tuple[int, int]]], timeout_s: float) -> dict[int, list[torch.Tensor]]:
        """``{src_rank: [(layer, expert), ...]}`` -> ``{src_rank: [packed [3, I, H], ...]}`` in request order."""
        ...


def decode_counts(reply: dict) -> torch.Tensor:
    """The ``[len(epochs), L, S]`` int64 counts of a :meth:`ExpertWorker.collect` reply."""
    import numpy as np

    flat = np.frombuffer(reply["counts"], dtype=np.int64)
    return torch.from_numpy(flat.copy()).view(*reply["shape"])


def local_fetcher(workers: Callable[[int], Any]) -> Fetcher:
    """A :class:`Fetcher` over in-process workers (unit tests, single-process use)."""

    def fetch(requests: dict[int, list[tuple[int, int]]], timeout_s: float) -> dict[int, list[torch.Tensor]]:
        return {r: workers(r).export(items) for r, items in requests.items()}

    return fetch
