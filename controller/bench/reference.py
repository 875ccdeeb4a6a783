"""A small MoE model for the demo and the checks: a real gate, and a dense single-process reference.

The gate of layer ``l`` has weights ``Wg[l]`` ``[H, E]``. To replay a real load trace as routing it
adds the trace window's log-popularity ``log p[l]`` and Gumbel noise to its logits before top-k
(the Gumbel-top-k trick: without the ``x @ Wg`` term this samples ``K`` distinct experts with
probabilities following ``p``), so the experts the tokens pick follow the trace while the gate stays
a real function of the tokens. Combine weights are the softmax of the gate logits over the chosen
experts (the trace bias does not enter them, as with DeepSeek's routing bias).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ray_eplb.actors.weights import WeightSource, swiglu


def rms_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``[N, H]`` -> ``[N, H]`` scaled to unit root-mean-square per token."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class TraceGate:
    """Top-k gate per layer, steered by a trace window (see the module docstring).

    Args:
        num_layers, hidden_size, num_experts, top_k: model shape.
        seed: seeds ``Wg`` ``[L, H, E]``.
    """

    def __init__(self, num_layers: int, hidden_size: int, num_experts: int, top_k: int, seed: int = 0):
        if not 0 < top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must lie in [1, num_experts={num_experts}]")
        gen = torch.Generator().manual_seed(seed + 7919)
        self.weight = torch.randn(num_layers, hidden_size, num_experts, generator=gen) * 0.1 * hidden_size**-0.5
        self.top_k = top_k

    def __call__(self, layer: int, x: torch.Tensor, popularity: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Route ``x [N, H]`` given ``popularity [E]`` (a trace window's load of this layer).

        Returns:
            ``topk_ids [N, K]`` int64 and ``topk_w [N, K]`` float32 (rows sum to 1).
        """
        logits = x @ self.weight[layer]  # [N, E]
        logp = torch.log(popularity.to(torch.float32).clamp(min=0) + 1e-3)  # [E]; every expert stays reachable
        u = torch.rand(logits.shape, generator=gen).clamp(1e-9, 1 - 1e-9)  # [N, E]
        gumbel = -torch.log(-torch.log(u))  # [N, E]
        ids = torch.topk(logits + logp + gumbel, self.top_k, dim=-1).indices  # [N, K]
        w = F.softmax(torch.gather(logits, 1, ids), dim=-1)  # [N, K]
        return ids, w


class DenseMoE:
    """Dense single-process reference: every expert's weights in one place, straight from the source.

    Args:
        source: the same weight source the workers use.
        num_layers, num_experts: model shape.
    """

    def __init__(self, source: WeightSource, num_layers: int, num_experts: int):
        self.experts = [[source.expert(layer, e) for e in range(num_experts)] for layer in range(num_layers)]

    def __call__(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        """``x [N, H]``, ``topk_ids [N, K]``, ``topk_w [N, K]`` -> ``[N, H]``."""
        out = torch.zeros_like(x)  # [N, H]
        for e in topk_ids.unique().tolist():
            tok, k = (topk_ids == e).nonzero(as_tuple=True)  # [M], [M]
            out.index_add_(0, tok, swiglu(x[tok], self.experts[layer][e]) * topk_w[tok, k, None])
        return out


def mismatched(y: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-4, atol: float = 1e-5) -> torch.Tensor:
    """``[N]`` bool: tokens whose output differs from the reference beyond float rounding.

    Different batch compositions change float32 summation order (last-bit differences); a token
    computed with a wrong expert differs by O(1), so the tolerance cleanly separates the two.
    """
    return ~torch.isclose(y, ref, rtol=rtol, atol=atol).all(dim=-1)
