"""Serve a transformers ``*ForCausalLM`` through ray-eplb: its routed experts run on the workers.

In transformers 5 every supported family (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3)
has a sparse block whose gate does the routing (top-k, normalisation, group limits, scaling) and
then calls its ``experts`` submodule as ``experts(hidden_states [N, H], top_k_index [N, K],
top_k_weights [N, K]) -> [N, H]``; shared experts are added by the block after that call.
:func:`attach` replaces only that ``experts`` submodule with :class:`DispatchedExperts`, which
sends the call to a dispatcher (:class:`~ray_eplb.actors.router.Router` over the worker actors, or
:class:`~ray_eplb.actors.router.LocalRouter` in one process). The gate, the shared experts and
everything else stay in the model's process; the model's own copy of the routed experts is dropped.
The workers load the experts from the same folder (:class:`~ray_eplb.actors.hf_checkpoint.HFCheckpointSource`)
and count every token they serve, so load telemetry flows as for any other model.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from ray_eplb.actors.hf_checkpoint import MoeSpec

_BLOCK_NAMES = ("mlp", "block_sparse_moe")


class Dispatcher(Protocol):
    """What :class:`DispatchedExperts` sends a layer's expert computation to."""

    def dispatch(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        """``x [N, H]``, ``topk_ids [N, K]``, ``topk_w [N, K]`` -> ``sum_k topk_w * expert(x)`` ``[N, H]``."""
        ...


class DispatchedExperts(nn.Module):
    """Stands in for a transformers ``*Experts`` module: same call, computed by the workers.

    Args:
        dispatcher: a :class:`Dispatcher`.
        layer: our MoE layer index of this block.
        num_experts: routed experts (ids outside ``[0, E)``, which transformers skips, are refused).
    """

    def __init__(self, dispatcher: Dispatcher, layer: int, num_experts: int):
        super().__init__()
        self.dispatcher, self.layer, self.num_experts = dispatcher, layer, num_experts

    def extra_repr(self) -> str:
        return f"layer={self.layer}, num_experts={self.num_experts}, dispatcher={type(self.dispatcher).__name__}"

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """``hidden_states [N, H]``, ``top_k_index [N, K]``, ``top_k_weights [N, K]`` -> ``[N, H]``
        in ``hidden_states``' dtype (each weighted expert output rounded to it once, as transformers does)."""
        # The routers combine on the host (workers answer with host tensors); a no-op for a cpu model.
        x = hidden_states.detach().reshape(-1, hidden_states.shape[-1]).cpu()  # [N, H]
        ids = top_k_index.reshape(x.shape[0], -1).to("cpu", torch.int64)  # [N, K]
        w = top_k_weights.detach().reshape(ids.shape).cpu()  # [N, K]
        out = self.dispatcher.dispatch(self.layer, x, ids, w)  # [N, H]
        return out.to(hidden_states.device).view(hidden_states.shape)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a ``*ForCausalLM`` (``model.model.layers``)."""
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no model.layers: not a decoder-only *ForCausalLM")
    return layers


def sparse_block(layer: nn.Module) -> nn.Module | None:
    """The sparse MoE block of a decoder layer (the module holding ``gate`` and ``experts``), else ``None``."""
    for name in _BLOCK_NAMES:
        block = getattr(layer, name, None)
        if block is not None and hasattr(block, "experts") and hasattr(block, "gate"):
            return block
    return None


def attach(model: nn.Module, dispatcher: Dispatcher, spec: MoeSpec | None = None) -> list[int]:
    """Route the routed experts of every sparse block of ``model`` through ``dispatcher``.

    Args:
        model: a transformers ``*ForCausalLM`` of one of the supported families (modified in place).
        dispatcher: where the expert computation goes; its layer ``l`` is decoder layer ``spec.moe_layers[l]``.
        spec: the model's MoE shape (default: read from ``model.config``).

    Returns:
        The decoder layers patched, in our MoE layer order (``spec.moe_layers``).
    """
    if spec is None:
        spec = MoeSpec.from_config(model.config.to_dict())
    layers = decoder_layers(model)
    if len(layers) != spec.num_hidden_layers:
        raise ValueError(f"the model has {len(layers)} decoder layers, its spec {spec.num_hidden_layers}")
    sparse = [i for i, layer in enumerate(layers) if sparse_block(layer) is not None]
    if sparse != list(spec.moe_layers):
        raise ValueError(f"the model's sparse layers {sparse} are not the spec's MoE layers {list(spec.moe_layers)}")
    blocks = [sparse_block(layers[i]) for i in spec.moe_layers]
    for i, block in zip(spec.moe_layers, blocks, strict=True):  # check every block before changing any
        experts = block.experts
        if isinstance(experts, DispatchedExperts):
            raise ValueError(f"decoder layer {i} is attached already")
        gate_up = getattr(experts, "gate_up_proj", None)
        want = (spec.num_experts, 2 * spec.ffn_size, spec.hidden_size)
        if gate_up is None or tuple(gate_up.shape) != want:
            got = None if gate_up is None else tuple(gate_up.shape)
            raise ValueError(f"decoder layer {i}: experts {type(experts).__name__} gate_up_proj {got}, expected {want}")
    for ours, block in enumerate(blocks):
        block.experts = DispatchedExperts(dispatcher, ours, spec.num_experts)
    return list(spec.moe_layers)


def attached_layers(model: nn.Module) -> list[int]:
    """Decoder layers of ``model`` whose experts go through a dispatcher. Attaching is one-way (the
    model's routed experts were dropped): reload the model to serve it without ray-eplb."""
    return [i for i, layer in enumerate(decoder_layers(model))
            if isinstance(getattr(sparse_block(layer), "experts", None), DispatchedExperts)]
