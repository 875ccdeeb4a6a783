"""A worker's weight tables: the served ones (one per epoch) and the one under construction.

Pure bookkeeping (no locks, no Ray): :class:`ExpertWorker` owns the locking.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ray_eplb.actors.protocol import Transfer


@dataclass
class Table:
    """The weights of one epoch on one rank."""

    epoch: int
    experts: torch.Tensor  # [L, S] int64, logical expert of each local slot
    weights: list[list[torch.Tensor]]  # [L][S] -> packed [3, I, H]
    digest: str | None = None  # digest of the whole map of this epoch (None: not known, plain use)
    in_flight: int = 0  # dispatches computing with this table now
    releasable: bool = False  # no router routes with this epoch any more


@dataclass
class Partial:
    """A table under construction: the batches of ``epoch`` staged so far on top of ``base``."""

    epoch: int
    experts: torch.Tensor  # [L, S] int64, the new slot map
    base: Table  # the active table when the epoch's first batch arrived
    weights: list[list[torch.Tensor]]  # [L][S] -> packed [3, I, H]; base's tensors until staged
    done: set[tuple[int, int]] = field(default_factory=set)  # (layer, local slot) staged so far
    digest: str | None = None  # digest of the new map (see Table.digest)

    @classmethod
    def start(cls, epoch: int, experts: torch.Tensor, base: Table, digest: str | None = None) -> "Partial":
        return cls(epoch, experts.clone(), base, [list(row) for row in base.weights], digest=digest)

    def as_table(self) -> Table:
        return Table(self.epoch, self.experts, self.weights, self.digest)

    def missing(self, rows: Sequence[Transfer], rank: int, slots_per_gpu: int) -> list[tuple[int, int]]:
        """``(layer, local slot)`` of changed slots that neither an earlier batch nor ``rows`` stage."""
        have = self.done | {(t.layer, t.dst_slot - rank * slots_per_gpu) for t in rows}
        changed = (self.experts != self.base.experts).nonzero().tolist()
        return [(layer, j) for layer, j in changed if (layer, j) not in have]


def check_rows(rank: int, slots_per_gpu: int, part: Partial, transfers: Sequence) -> list[Transfer]:
    """``transfers`` (rows or plain tuples) as :class:`Transfer` rows for ``rank``, each checked
    against the new map of ``part``, minus slots already staged; sorted by (layer, slot)."""
    rows: dict[tuple[int, int], Transfer] = {}
    for t in transfers:
        t = Transfer(*t)
        j = t.dst_slot - rank * slots_per_gpu
        if t.dst_rank != rank or not 0 <= j < slots_per_gpu:
            raise ValueError(f"transfer {t} is not for rank {rank}")
        if int(part.experts[t.layer, j]) != t.expert:
            raise ValueError(f"transfer {t} disagrees with the new map (slot holds {int(part.experts[t.layer, j])})")
        if (t.layer, j) not in part.done:
            rows[(t.layer, j)] = t
    return [rows[k] for k in sorted(rows)]
