"""The per-GPU expert worker as a plain class (no Ray import): weights, compute, counters, swap.

A worker serves rank ``rank`` of a :class:`~ray_eplb.topology.Topology`: ``S = slots_per_gpu`` slots in
each of ``L`` MoE layers. Its weights live in *tables*, one per epoch: ``table[l][j]`` is the packed
``[3, I, H]`` tensor of local slot ``j`` in layer ``l``. Tables of different epochs share the tensors
of slots that did not change, so a swap costs memory only for the slots it moves.

The swap protocol (``prepare`` / ``commit`` / ``abort`` / ``release``) lives in
:mod:`ray_eplb.actors.epoch_swap`.

A dispatch (``forward``) names the map it was routed by, as ``(epoch, digest)``
(:class:`~ray_eplb.topology.MapId`), and is computed with that epoch's table only if the table's map
has that digest; any other map (an epoch the worker does not hold, or a stale or forged map under a
held epoch number) raises :class:`StaleEpochError` (the router then refreshes its map and
re-routes), so a token never meets the wrong expert.
"""
from __future__ import annotations

import os
import threading
import time
import uuid
from dataclasses import dataclass

import torch

from ray_eplb.actors.epoch_swap import EpochSwap
from ray_eplb.actors.protocol import Fetcher, StaleEpochError, Transfer, decode_counts, local_fetcher
from ray_eplb.actors.shared_pages import release_unused, store_resident_bytes
from ray_eplb.actors.staging import Staging
from ray_eplb.actors.tables import Partial, Table
from ray_eplb.actors.weights import WeightSource, swiglu
from ray_eplb.topology import MapId, Topology

__all__ = ["ExpertWorker", "Fetcher", "StaleEpochError", "Transfer", "decode_counts", "local_fetcher"]


@dataclass
class _Stats:
    dispatches: int = 0
    tokens: int = 0
    max_lock_wait_s: float = 0.0
    moved: int = 0
    stale_dispatches: int = 0
    store_pages_released: int = 0  # bytes of object-store address space unmapped (see shared_pages)


class ExpertWorker(EpochSwap):
    """Expert weights and compute of one rank. Thread-safe (Ray runs it as a threaded actor).

    Args:
        rank: this worker's rank in ``topology``.
        topology: the deployment shape.
        experts: ``[L, S]`` int64, logical expert of each local slot at ``epoch``.
        source: where weights come from when no peer has them.
        fetcher: peer transfer function (``None``: everything not local comes from ``source``).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"`` (cuda when available).
        epoch: epoch of ``experts``.
        keep_count_epochs: how many epochs' token counters to keep for telemetry.
        spare_fraction: staging buffers allocated up front, as a fraction of the ``L * S`` slots.
            Received weights are copied into these (memory already touched: a fresh allocation
            costs ~10x a copy on VMs where page faults are expensive, and a GPU needs its staging
            memory reserved anyway); buffers of released tables return to the pool.
        stage_nice: staging (fetching and copying weights) runs on one thread with this much lower
            OS priority, so a swap takes the CPU that serving leaves idle (``None``: the caller's thread).
        stage_duty: fraction of the time staging may keep busy: weights move in chunks of
            ``stage_chunk_bytes`` and staging rests ``(1 - duty) / duty`` times each chunk's time
            between chunks (1.0: as fast as possible). A slower swap costs nothing in correctness
            (old slots keep serving) and leaves serving its bandwidth and CPU.
        stage_borrow_bytes: on a cpu worker, weights a peer sent through Ray's object store are
            kept there (zero-copy, read-only) up to this many pinned bytes, copied beyond it
            (``None``: as many bytes as this worker's own slots hold, and in a Ray actor at most
            its share of half its node's object store; ``0``: always copy). A copy halves the
            transfer bandwidth (see :mod:`ray_eplb.actors.staging`).
    """

    def __init__(
        self,
        rank: int,
        topology: Topology,
        experts: torch.Tensor,
        source: WeightSource,
        fetcher: Fetcher | None = None,
        device: str = "auto",
        epoch: int = 0,
        keep_count_epochs: int = 8,
        spare_fraction: float = 0.25,
        stage_nice: int | None = None,
        stage_duty: float = 0.25,
        stage_chunk_bytes: int = 2 * 2**20,
        stage_borrow_bytes: int | None = None,
        digest: str | None = None,
    ):
        if not 0 <= rank < topology.num_gpus:
            raise ValueError(f"rank={rank} is outside the topology's {topology.num_gpus} ranks")
        experts = torch.as_tensor(experts, dtype=torch.int64).cpu()
        want = (topology.num_layers, topology.slots_per_gpu)
        if tuple(experts.shape) != want:
            raise ValueError(f"experts has shape {tuple(experts.shape)}, rank {rank} needs {want}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.rank, self.topology, self.source, self.fetcher = rank, topology, source, fetcher
        self.incarnation = uuid.uuid4().hex[:8]  # this process's counters: telemetry sees a restart
        self.device = torch.device(device)
        self.keep_count_epochs = keep_count_epochs
        self._lock = threading.Lock()
        self._faults: dict[str, float] = {}
        self.stats = _Stats()
        self.staging = Staging(self.device, self._lock, stage_nice, stage_duty, stage_chunk_bytes, f"eplb-{rank}")
        weights = [[self.staging.own(source.expert(layer, int(e))) for e in row] for layer, row in enumerate(experts)]
        self._tables: dict[int, Table] = {epoch: Table(epoch, experts, weights, digest)}
        self.epoch = epoch
        self._staged: Table | None = None
        self._partial: Partial | None = None
        self._stage_lock = threading.Lock()  # one staging call at a time: batches build on each other
        self._max_aborted = -1
        self._counts: dict[int, torch.Tensor] = {epoch: torch.zeros(want, dtype=torch.int64)}  # epoch -> [L, S]
        self.staging.prewarm(weights[0][0], int(spare_fraction * topology.num_layers * topology.slots_per_gpu))
        table_bytes = sum(w.numel() * w.element_size() for row in weights for w in row)
        self.staging.borrow_bytes = table_bytes if stage_borrow_bytes is None else stage_borrow_bytes

    # ------------------------------------------------------------------ identity
    def __repr__(self) -> str:
        t = self.topology
        return (
            f"{type(self).__name__}(rank={self.rank}, node={t.node_of_rank(self.rank)}, slots={t.slots_per_gpu}, "
            f"layers={t.num_layers}, hidden={self.source.hidden_size}, ffn={self.source.ffn_size}, "
            f"device={self.device.type})"
        )

    def _recycle(self, dropped: list[Table]) -> None:
        """Under the lock: give the buffers that only ``dropped`` tables used back to the staging pool."""
        live = {id(w) for w in self._weights_in_use()}
        self.staging.recycle((w for t in dropped for row in t.weights for w in row), live)

    def _weights_in_use(self) -> list[torch.Tensor]:
        """Under the lock: every weight tensor of the served, sealed and partial tables."""
        return [w for t in [*self._tables.values(), self._staged, self._partial] if t is not None
                for row in t.weights for w in row]

    def _release_store_pages(self, in_use: list[torch.Tensor]) -> None:
        """Unmap the object-store pages no table uses (peers' replies already copied, retired borrowed
        weights, replies written for peers), so RSS tracks what is served. Safe without the lock: a
        page unmapped while a new staging reads it is faulted back in with the same bytes."""
        self.stats.store_pages_released += release_unused(in_use)

    def _fault(self, method: str) -> None:
        delay = self._faults.get(method, 0.0)
        if delay > 0:
            time.sleep(delay)

    def inject_delay(self, method: str, seconds: float) -> None:
        """Fault injection for tests and benchmarks: ``method`` sleeps ``seconds`` before working (0 clears)."""
        if method not in ("collect", "prepare", "commit", "forward", "ping"):
            raise ValueError(f"cannot inject a delay into {method!r}")
        self._faults[method] = float(seconds)

    def ping(self) -> int:
        """The no-op call (the fan-out baseline of the runtime benchmark)."""
        self._fault("ping")
        return self.rank

    # ------------------------------------------------------------------ serving
    def forward(self, map_id: MapId | tuple | int, layer: int, slots: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Compute the expert outputs of one dispatch.

        Args:
            map_id: ``(epoch, digest)`` of the map the router used (:meth:`Placement.map_id`). A
                table built without a digest (single-process use, no controller) is served by
                epoch alone, and a plain epoch number is accepted for it; a table with a digest
                (every worker :func:`launch_workers` starts) serves only its exact map.
            layer: MoE layer.
            slots: ``[N]`` int64 local slot (``0 <= j < S``) of each token.
            x: ``[N, H]`` token activations, any floating dtype (the experts compute in their own).

        Returns:
            ``[N, H]`` in ``x``'s dtype (on cpu when the worker is on a GPU, so the router can combine anywhere).
        """
        self._fault("forward")
        if not 0 <= layer < self.topology.num_layers:
            raise ValueError(f"layer={layer} is outside [0, {self.topology.num_layers})")
        slots = torch.as_tensor(slots, dtype=torch.int64)
        if slots.dim() != 1 or x.dim() != 2 or x.shape[0] != slots.shape[0]:
            raise ValueError(f"slots {tuple(slots.shape)} and x {tuple(x.shape)} must be [N] and [N, H]")
        if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= self.topology.slots_per_gpu):
            raise ValueError(f"local slot ids must lie in [0, {self.topology.slots_per_gpu})")
        t0 = time.perf_counter()
        with self._lock:
            wait = time.perf_counter() - t0
            epoch, digest = (int(map_id[0]), map_id[1]) if isinstance(map_id, tuple) else (int(map_id), None)
            table = self._tables.get(epoch)
            if table is None or (table.digest is not None and table.digest != digest):
                self.stats.stale_dispatches += 1
                why = "" if table is None else f"epoch {epoch} here is map {table.digest}, not {digest}"
                raise StaleEpochError(self.rank, epoch, self._tables, why)
            table.in_flight += 1
            self.stats.max_lock_wait_s = max(self.stats.max_lock_wait_s, wait)
        try:
            xd = x.to(self.device, non_blocking=True)
            out = torch.empty_like(xd)  # [N, H] in the caller's dtype (swiglu computes in the expert's)
            per_slot = torch.bincount(slots, minlength=self.topology.slots_per_gpu)  # [S]
            order = torch.argsort(slots, stable=True)  # [N] tokens grouped by slot
            start = 0
            for j, n in enumerate(per_slot.tolist()):
                if n:
                    idx = order[start : start + n].to(self.device)
                    out[idx] = swiglu(xd[idx], table.weights[layer][j])
                    start += n
        finally:
            with self._lock:
                table.in_flight -= 1
                counts = self._counts.get(epoch)
                if counts is not None:
                    counts[layer] += per_slot
                self.stats.dispatches += 1
                self.stats.tokens += int(slots.numel())
                self._drop_released()
        return out.cpu() if out.device.type != "cpu" else out

    def collect(self) -> dict:
        """Telemetry: cumulative token counts of the last few epochs: ``epochs`` (list) and
        ``counts``, int64 ``[len(epochs), L, S]`` as raw bytes (decode with :func:`decode_counts`),
        with ``dtype`` and ``shape`` to check them by; ``epoch`` and ``digest``: the map this worker
        serves now (the controller brings a worker on another map back to its own)."""
        self._fault("collect")
        with self._lock:
            epochs = sorted(self._counts)
            counts = torch.stack([self._counts[e] for e in epochs])  # [n_epochs, L, S] int64
            epoch, digest = self.epoch, self._tables[self.epoch].digest
        # Raw bytes, not a tensor: a telemetry reply is small, and Ray's tensor path costs ~2x a
        # no-op call in a fan-out to 8 workers where plain bytes cost ~1.2x (ray-eplb bench-runtime, Ray 2.60).
        return {"rank": self.rank, "epoch": epoch, "digest": digest, "epochs": epochs,
                "incarnation": self.incarnation, "dtype": "int64", "shape": tuple(counts.shape),
                "counts": counts.numpy().tobytes()}

    # ------------------------------------------------------------------ inspection
    def state(self) -> dict:
        """Epoch, slot map ``experts [L, S]``, staged epoch, held tables and counters."""
        with self._lock:
            w0 = self._tables[self.epoch].weights[0][0]  # packed [3, I, H]: every expert's size
            return {
                "rank": self.rank,
                "incarnation": self.incarnation,
                "epoch": self.epoch,
                "digest": self._tables[self.epoch].digest,
                "experts": self._tables[self.epoch].experts.clone(),
                "staged": None if self._staged is None else self._staged.epoch,
                "staging": None if self._partial is None else self._partial.epoch,
                "held": sorted(self._tables),
                "max_aborted": self._max_aborted,
                "device": self.device.type,
                "dispatches": self.stats.dispatches,
                "tokens": self.stats.tokens,
                "stale_dispatches": self.stats.stale_dispatches,
                "max_lock_wait_ms": 1e3 * self.stats.max_lock_wait_s,
                "moved": self.stats.moved,
                "fetched_bytes": self.staging.fetched_bytes,
                "fetch_s": self.staging.fetch_s,
                "free_buffers": len(self.staging.pool),
                "borrowed_bytes": self.staging.borrowed_bytes,
                "borrow_cap": self.staging.borrow_bytes,
                "borrowed_total": self.staging.borrowed_total,
                "store_pages_released": self.stats.store_pages_released,
                "expert_bytes": w0.numel() * w0.element_size(),
            }

    def memory(self) -> dict:
        """This process's memory as an operator sees it: RSS, the part of it that is object-store pages
        (shared, counted once mapped), and the object-store address space released so far (bytes)."""
        try:
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # not Linux
            rss = 0
        return {"rank": self.rank, "rss": rss, "store_resident": store_resident_bytes(),
                "store_pages_released": self.stats.store_pages_released}

    def verify(self, epoch: int | None = None) -> list[tuple[int, int, int]]:
        """Identity check: ``(layer, local slot, expert)`` of every slot whose weights differ from the
        source's weights of the expert the map says it holds (empty list: all correct)."""
        with self._lock:
            table = self._tables[self.epoch if epoch is None else epoch]
        bad = []
        for layer, row in enumerate(table.experts.tolist()):
            for j, e in enumerate(row):
                if not torch.equal(table.weights[layer][j].cpu(), self.source.expert(layer, e)):
                    bad.append((layer, j, e))
        return bad
