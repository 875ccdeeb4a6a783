"""The cluster shape an expert placement is solved for."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Topology(BaseModel):
    """Shape of an expert-parallel deployment.

    ``num_nodes * gpus_per_node`` ranks (GPUs), each with ``slots_per_gpu`` expert slots, serve
    ``num_experts`` logical experts in each of ``num_layers`` MoE layers. ``num_groups`` is the
    number of expert groups (DeepSeek's node-limited routing); 1 when the model has none.
    Ranks are numbered node-major: rank ``r`` lives on node ``r // gpus_per_node``; slot ``s``
    lives on rank ``s // slots_per_gpu``.
    """

    model_config = ConfigDict(frozen=True)

    num_nodes: int = Field(gt=0)
    gpus_per_node: int = Field(gt=0)
    slots_per_gpu: int = Field(gt=0)
    num_experts: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    num_groups: int = Field(default=1, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "Topology":
        if self.num_slots < self.num_experts:
            raise ValueError(
                f"num_slots={self.num_slots} (= {self.num_gpus} GPUs x {self.slots_per_gpu} slots) "
                f"is smaller than num_experts={self.num_experts}: every expert needs a slot"
            )
        return self

    @property
    def num_gpus(self) -> int:
        return self.num_nodes * self.gpus_per_node

    @property
    def num_slots(self) -> int:
        """Physical experts (slots) per layer, R."""
        return self.num_gpus * self.slots_per_gpu

    @property
    def slots_per_node(self) -> int:
        return self.gpus_per_node * self.slots_per_gpu

    def rank_of_slot(self, slot: int) -> int:
        return slot // self.slots_per_gpu

    def node_of_rank(self, rank: int) -> int:
        return rank // self.gpus_per_node

    def slots_of_rank(self, rank: int) -> range:
        return range(rank * self.slots_per_gpu, (rank + 1) * self.slots_per_gpu)

    @classmethod
    def from_counts(
        cls,
        num_replicas: int,
        num_gpus: int,
        num_nodes: int,
        num_experts: int,
        num_layers: int,
        num_groups: int = 1,
    ) -> "Topology":
        """Build from the DeepSeek-style arguments (R, GPUs, nodes), checking divisibility."""
        if num_nodes <= 0 or num_gpus <= 0 or num_gpus % num_nodes:
            raise ValueError(f"num_gpus={num_gpus} must be a positive multiple of num_nodes={num_nodes}")
        if num_replicas % num_gpus:
            raise ValueError(f"num_replicas={num_replicas} is not divisible by num_gpus={num_gpus}")
        return cls(
            num_nodes=num_nodes,
            gpus_per_node=num_gpus // num_nodes,
            slots_per_gpu=num_replicas // num_gpus,
            num_experts=num_experts,
            num_layers=num_layers,
            num_groups=num_groups,
        )
