"""The swap protocol's shared types: a transfer row, the stale-epoch error, the peer-fetch interface,
the wire formats of telemetry and of weights."""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Protocol, Sequence

import numpy as np
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
    """A dispatch named a map this worker does not hold: an epoch never committed here or already
    released, or an epoch whose map differs from the one the worker holds under that number (a
    stale or forged map). The router then asks the controller for the map in force."""

    def __init__(self, rank: int, epoch: int, held: Sequence[int], why: str = ""):
        why = why or f"epoch {epoch} is not served here"
        super().__init__(f"worker {rank}: {why} (held: {sorted(held)})")
        self.rank, self.epoch, self.held, self.why = rank, epoch, list(held), why

    def __reduce__(self):
        return (StaleEpochError, (self.rank, self.epoch, self.held, self.why))


class Fetcher(Protocol):
    """Fetches packed expert weights from peer workers, in parallel over sources."""

    def __call__(self, requests: dict[int, list[tuple[int, int]]], timeout_s: float) -> dict[int, list[torch.Tensor]]:
        """``{src_rank: [(layer, expert), ...]}`` -> ``{src_rank: [packed [3, I, H], ...]}`` in request order."""
        ...


def decode_counts(reply: dict) -> torch.Tensor:
    """The ``[len(epochs), L, S]`` int64 counts of a :meth:`ExpertWorker.collect` reply."""
    flat = np.frombuffer(reply["counts"], dtype=np.int64)
    return torch.from_numpy(flat.copy()).view(*reply["shape"])


def local_fetcher(workers: Callable[[int], Any]) -> Fetcher:
    """A :class:`Fetcher` over in-process workers (unit tests, single-process use)."""

    def fetch(requests: dict[int, list[tuple[int, int]]], timeout_s: float) -> dict[int, list[torch.Tensor]]:
        return {r: workers(r).export(items) for r, items in requests.items()}

    return fetch


# Ray copies a buffer of 1 MiB or more into the object store with several threads it starts for
# that buffer: measured with Ray 2.60 on a 2-core CPU machine, a reply of 36 experts of 1.5 MB wrote at ~1.4-4.8 GB/s, the same bytes
# as pieces under 1 MiB at ~8 GB/s, like one blob. So weights travel as pieces of this many bytes.
PIECE_BYTES = 512 * 1024


def pack_reply(tensors: list[torch.Tensor]) -> dict:
    """Weights on the wire: each tensor's bytes as flat uint8 numpy views of at most
    :data:`PIECE_BYTES` (no copy), plus the dtype and shape they share. Ray writes numpy buffers
    straight into the object store, each piece 64-byte aligned (``PIECE_BYTES`` is a multiple of 64,
    so a tensor's pieces lie end to end there), and a reader maps them zero-copy, for any dtype
    (numpy has no bfloat16) and with no Ray flag set."""
    if not tensors:
        return {"dtype": "float32", "shape": (), "pieces": []}
    dtype, shape = tensors[0].dtype, tuple(tensors[0].shape)
    pieces = []
    for w in tensors:
        if w.dtype != dtype or tuple(w.shape) != shape:
            raise ValueError(f"a reply mixes {w.dtype} {tuple(w.shape)} with {dtype} {shape}")
        raw = w.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()  # [nbytes]
        pieces.append([raw[i : i + PIECE_BYTES] for i in range(0, max(len(raw), 1), PIECE_BYTES)])
    return {"dtype": str(dtype).removeprefix("torch."), "shape": shape, "pieces": pieces}


def unpack_reply(reply: dict) -> list[torch.Tensor]:
    """The tensors of a :func:`pack_reply` reply, each a read-only view of the object store when
    its pieces lie end to end there (checked by address), else joined by a copy."""
    dtype = getattr(torch, reply["dtype"])
    out = []
    for pieces in reply["pieces"]:
        nbytes = sum(len(p) for p in pieces)
        base = pieces[0].ctypes.data
        offsets = np.cumsum([0] + [len(p) for p in pieces[:-1]])
        if all(p.ctypes.data == base + int(o) for p, o in zip(pieces, offsets)):
            # One view over the pieces: its base keeps the first piece, hence the whole object
            # (all pieces are slices of one object-store buffer), mapped.
            raw = np.lib.stride_tricks.as_strided(pieces[0], shape=(nbytes,), strides=(1,), writeable=False)
        else:
            raw = np.concatenate(pieces)
        out.append(torch.from_numpy(raw).view(dtype).view(reply["shape"]))
    return out
