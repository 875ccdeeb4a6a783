"""A versioned expert placement: the three maps of one epoch, checked against a Topology."""
from __future__ import annotations

import hashlib
import operator
from typing import Any, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from ray_eplb.solver.maps import logical_maps
from ray_eplb.topology.shape import Topology


def _every_expert_placed(logcnt: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the first expert with no slot in ``logcnt [L, E]``."""
    if bool((logcnt == 0).any()):
        layer, expert = (logcnt == 0).nonzero()[0].tolist()
        raise ValueError(f"expert {expert} of layer {layer} has no slot")


class MapId(NamedTuple):
    """The identity of one placement: its ``epoch`` and the :meth:`Placement.digest` of its slot
    map. An epoch number is never reused for another map; the digest makes a stale or forged map
    that carries a served epoch number visible anyway."""

    epoch: int
    digest: str


class Placement(BaseModel):
    """Which logical expert each slot holds, at one epoch.

    Fields:
        topology: the shape this placement is for.
        epoch: version number; a newer placement has a larger epoch.
        phy2log: ``[L, R]`` int64, logical expert of each slot.
        log2phy: ``[L, E, R-E+1]`` int64, slots of each logical expert, ``-1`` padded.
        logcnt: ``[L, E]`` int64, replicas per logical expert.
    """

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    topology: Topology
    epoch: int = Field(default=0, ge=0)
    phy2log: torch.Tensor
    log2phy: torch.Tensor
    logcnt: torch.Tensor
    _digest: str | None = PrivateAttr(default=None)  # digest() computed once (phy2log never changes)

    @model_validator(mode="after")
    def _check(self) -> "Placement":
        t = self.topology
        want = {
            "phy2log": (t.num_layers, t.num_slots),
            "log2phy": (t.num_layers, t.num_experts, t.num_slots - t.num_experts + 1),
            "logcnt": (t.num_layers, t.num_experts),
        }
        for name, shape in want.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"{name} has shape {got}, the topology needs {shape}")
        if self.phy2log.dtype != torch.int64:
            raise ValueError(f"phy2log must be int64, got {self.phy2log.dtype}")
        log2phy, logcnt = logical_maps(self.phy2log, t.num_experts)
        if not torch.equal(logcnt, self.logcnt.to(logcnt.device)):
            raise ValueError("logcnt does not match phy2log")
        _every_expert_placed(logcnt)
        if not torch.equal(log2phy, self.log2phy.to(log2phy.device)):
            raise ValueError("log2phy does not invert phy2log")
        return self

    def __eq__(self, other: object) -> bool:
        """Value equality: same topology, epoch and maps (tensors compared by content)."""
        if not isinstance(other, Placement):
            return NotImplemented
        return (
            self.topology == other.topology
            and self.epoch == other.epoch
            and torch.equal(self.phy2log.cpu(), other.phy2log.cpu())
        )  # log2phy and logcnt are derived from phy2log (checked at construction)

    __hash__ = None  # tensors are mutable: a placement is not a dict key

    @classmethod
    def from_phy2log(cls, topology: Topology, phy2log: torch.Tensor, epoch: int = 0) -> "Placement":
        """Build a placement from its slot map ``phy2log [L, R]`` (any integer sequence).

        Checked as the constructor checks it (shape, expert ids in range, every expert placed,
        ``epoch >= 0``); ``log2phy`` and ``logcnt`` are derived here once, so the constructor's
        check that they invert ``phy2log`` (a second derivation and a comparison: at 58 x 256 experts
        on 2048 slots, 213 MB each) is not repeated.
        """
        try:
            epoch = operator.index(epoch)
        except TypeError:
            raise ValueError(f"epoch={epoch!r} must be an int >= 0") from None
        if epoch < 0:
            raise ValueError(f"epoch={epoch} must be an int >= 0")
        phy2log = torch.as_tensor(phy2log, dtype=torch.int64)
        want = (topology.num_layers, topology.num_slots)
        if tuple(phy2log.shape) != want:
            raise ValueError(f"phy2log has shape {tuple(phy2log.shape)}, the topology needs {want}")
        log2phy, logcnt = logical_maps(phy2log, topology.num_experts)
        _every_expert_placed(logcnt)
        return cls.model_construct(topology=topology, epoch=epoch, phy2log=phy2log, log2phy=log2phy, logcnt=logcnt)

    @classmethod
    def identity(cls, topology: Topology, epoch: int = 0) -> "Placement":
        """Round-robin start placement: slot ``s`` holds expert ``s % E`` in every layer."""
        row = torch.arange(topology.num_slots, dtype=torch.int64) % topology.num_experts
        return cls.from_phy2log(topology, row.expand(topology.num_layers, -1).clone(), epoch)

    def rank_experts(self, rank: int) -> torch.Tensor:
        """``[L, S]`` logical experts held by ``rank``'s slots."""
        s = self.topology.slots_per_gpu
        return self.phy2log[:, rank * s : (rank + 1) * s]

    def changed_slots(self, other: "Placement") -> torch.Tensor:
        """``[L, R]`` bool: slots whose expert differs between ``self`` and ``other``."""
        if other.topology != self.topology:
            raise ValueError("placements are for different topologies")
        return self.phy2log != other.phy2log.to(self.phy2log.device)

    def digest(self) -> str:
        """Fingerprint of the slot map (16 hex digits of BLAKE2b over ``phy2log``'s shape and
        values): two placements with the same digest hold the same expert in every slot. With the
        epoch it names one map exactly; workers serve a dispatch only if both match their table."""
        if self._digest is None:
            p = self.phy2log.detach().to("cpu", torch.int64).contiguous()
            h = hashlib.blake2b(digest_size=8)
            h.update(repr(tuple(p.shape)).encode())
            h.update(p.numpy().tobytes())
            self._digest = h.hexdigest()
        return self._digest

    def map_id(self) -> "MapId":
        """``(epoch, digest)``: what a dispatch carries to name the map it was routed by."""
        return MapId(self.epoch, self.digest())

    def with_epoch(self, epoch: int) -> "Placement":
        return self.model_copy(update={"epoch": epoch})


def plan(topology: Topology, weight: torch.Tensor, *, epoch: int = 0, **solver_kwargs: Any) -> Placement:
    """Solve a placement for ``weight [L, E]`` on ``topology`` (typed front of ``rebalance_experts``).

    ``solver_kwargs`` go to :func:`ray_eplb.solver.place_experts` (``policy``, ``method``,
    ``old_phy2log``, ...); the maps are derived once, by :meth:`Placement.from_phy2log`.
    """
    from ray_eplb.solver import place_experts

    if tuple(weight.shape) != (topology.num_layers, topology.num_experts):
        raise ValueError(
            f"weight has shape {tuple(weight.shape)}, the topology needs "
            f"({topology.num_layers}, {topology.num_experts})"
        )
    phy2log = place_experts(
        weight, topology.num_slots, topology.num_groups, topology.num_nodes, topology.num_gpus, **solver_kwargs
    )
    return Placement.from_phy2log(topology, phy2log, epoch)
