"""Expert weights from a local Hugging Face model folder (``config.json`` plus one or sharded
``*.safetensors`` files, with ``model.safetensors.index.json`` when sharded).

:class:`MoeSpec` is what the balancer needs from ``config.json``: which decoder layers are sparse
(dense first layers, a sparse step), experts, top-k, hidden and expert FFN sizes, expert groups.
Our MoE layer ``l`` is decoder layer ``spec.moe_layers[l]``; the mapping is explicit both ways.

:class:`HFCheckpointSource` reads the routed experts of those layers in any of the namings below,
one expert at a time (a fused tensor is sliced, never read whole), in the checkpoint's dtype:

- per expert, ``{block}.experts.{e}.{gate,up,down}_proj.weight`` (Qwen2-MoE, Qwen3-MoE, OLMoE,
  DeepSeek-V2/V3) or ``{block}.experts.{e}.{w1,w3,w2}.weight`` (Mixtral, ``block = block_sparse_moe``);
- fused, ``{block}.experts.gate_up_proj`` ``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]`` (transformers
  5's in-memory layout), or transposed, ``[E, H, 2I]`` and ``[E, I, H]`` (the layout Llama 4 ships);
  gate rows (columns) come first, then up.

Shared experts (Qwen2-MoE's ``shared_expert``, DeepSeek's ``shared_experts``) are never read here:
they stay with the model and are never balanced.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ray_eplb.actors.weights import pack

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")
_BLOCKS = ("mlp", "block_sparse_moe", "feed_forward")
_PER_EXPERT = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))


class MoeSpec(BaseModel):
    """The MoE shape of a model, read from its ``config.json`` (see :meth:`from_config`).

    Fields:
        model_type: the config's ``model_type`` (one of :data:`FAMILIES`).
        num_hidden_layers: decoder layers, dense and sparse.
        moe_layers: decoder layer index of each MoE layer, ascending (our layer ``l`` is ``moe_layers[l]``).
        num_experts: routed experts per MoE layer.
        top_k: experts per token.
        hidden_size: ``H``.
        ffn_size: ``I``, one routed expert's FFN width.
        num_groups: expert groups of group-limited routing (DeepSeek's ``n_group``), else 1.
        topk_groups: groups a token may pick from (DeepSeek's ``topk_group``), else ``None``.
        shared_experts: whether the sparse block has shared experts (kept in the model).
        dtype: the config's dtype name (``"bfloat16"``...), ``None`` when it names none.
    """

    model_config = ConfigDict(frozen=True)

    model_type: str
    num_hidden_layers: int = Field(gt=0)
    moe_layers: tuple[int, ...]
    num_experts: int = Field(gt=0)
    top_k: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    ffn_size: int = Field(gt=0)
    num_groups: int = Field(default=1, gt=0)
    topk_groups: int | None = None
    shared_experts: bool = False
    dtype: str | None = None

    @model_validator(mode="after")
    def _check(self) -> MoeSpec:
        if not self.moe_layers:
            raise ValueError(f"{self.model_type}: the config makes no decoder layer sparse")
        layers, n = list(self.moe_layers), self.num_hidden_layers
        if layers != sorted(set(layers)) or layers[0] < 0 or layers[-1] >= n:
            raise ValueError(f"moe_layers={self.moe_layers} must be distinct, ascending, in [0, {n})")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.num_experts % self.num_groups:
            raise ValueError(f"num_experts={self.num_experts} is not divisible by num_groups={self.num_groups}")
        return self

    @property
    def num_layers(self) -> int:
        """MoE layers ``L`` (the balancer's layer count)."""
        return len(self.moe_layers)

    def layer_index(self, decoder_layer: int) -> int:
        """Our MoE layer index of ``decoder_layer`` (``ValueError`` for a dense layer)."""
        try:
            return self.moe_layers.index(decoder_layer)
        except ValueError:
            sparse = list(self.moe_layers)
            raise ValueError(f"decoder layer {decoder_layer} is not sparse (MoE layers: {sparse})") from None

    def topology(self, num_nodes: int, gpus_per_node: int, slots_per_gpu: int) -> Any:
        """A :class:`~ray_eplb.topology.Topology` for this model on that many nodes, GPUs and slots."""
        from ray_eplb.topology import Topology

        return Topology(num_nodes=num_nodes, gpus_per_node=gpus_per_node, slots_per_gpu=slots_per_gpu,
                        num_experts=self.num_experts, num_layers=self.num_layers, num_groups=self.num_groups)

    @classmethod
    def from_config(cls, config: dict) -> MoeSpec:
        """Read a ``config.json`` dict (or a transformers config's ``to_dict()``)."""
        kind = config.get("model_type")
        if kind not in FAMILIES:
            raise ValueError(f"model_type={kind!r} is not a known MoE family (known: {', '.join(FAMILIES)})")
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act={act!r}: the experts are SwiGLU, which needs 'silu'")
        n = _need(config, "num_hidden_layers")
        groups, topk_groups, shared = 1, None, False
        if kind in ("mixtral", "olmoe"):
            experts, ffn = _need(config, "num_local_experts", "num_experts"), _need(config, "intermediate_size")
            moe = list(range(n))
        elif kind in ("qwen2_moe", "qwen3_moe"):
            experts, ffn = _need(config, "num_experts", "num_local_experts"), _need(config, "moe_intermediate_size")
            step, dense = int(config.get("decoder_sparse_step", 1)), set(config.get("mlp_only_layers") or [])
            if step <= 0:
                raise ValueError(f"decoder_sparse_step={step} must be positive")
            moe = [i for i in range(n) if i not in dense and (i + 1) % step == 0]
            shared = kind == "qwen2_moe" and int(config.get("shared_expert_intermediate_size") or 0) > 0
        else:  # deepseek_v2, deepseek_v3
            experts = _need(config, "n_routed_experts", "num_local_experts")
            ffn = _need(config, "moe_intermediate_size")
            first, freq = int(config.get("first_k_dense_replace", 0)), int(config.get("moe_layer_freq", 1))
            if freq <= 0:
                raise ValueError(f"moe_layer_freq={freq} must be positive")
            moe = [i for i in range(first, n) if i % freq == 0]
            shared = int(config.get("n_shared_experts") or 0) > 0
            n_group = int(config.get("n_group") or 1)
            limited = kind == "deepseek_v3" or config.get("topk_method") in ("group_limited_greedy", "noaux_tc")
            if n_group > 1 and limited:
                groups, topk_groups = n_group, int(config.get("topk_group") or n_group)
        return cls(
            model_type=kind, num_hidden_layers=n, moe_layers=tuple(moe), num_experts=experts,
            top_k=_need(config, "num_experts_per_tok"), hidden_size=_need(config, "hidden_size"), ffn_size=ffn,
            num_groups=groups, topk_groups=topk_groups, shared_experts=shared,
            dtype=config.get("dtype") or config.get("torch_dtype"),
        )

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> MoeSpec:
        """Read ``path/config.json``."""
        f = Path(path) / "config.json"
        if not f.is_file():
            raise ValueError(f"no config.json in {str(path)!r}")
        return cls.from_config(json.loads(f.read_text()))


def _need(config: dict, *names: str) -> int:
    for name in names:
        if config.get(name) is not None:
            return int(config[name])
    raise ValueError(f"config.json has none of {names}")


class HFCheckpointSource:
    """A :class:`~ray_eplb.actors.weights.WeightSource` over a Hugging Face model folder.

    Args:
        path: the folder (``config.json`` and its safetensors files).
        dtype: cast experts to this dtype on load (``None``: keep the checkpoint's).

    ``expert(l, e)`` is expert ``e`` of our MoE layer ``l`` (decoder layer ``spec.moe_layers[l]``).
    Only the key index (the safetensors headers, or ``model.safetensors.index.json``) is read up
    front; a shard is opened the first time one of its experts is asked for. The object pickles as
    its arguments, so a worker actor opens the files in its own process.
    """

    def __init__(self, path: str | os.PathLike, dtype: torch.dtype | None = None):
        self.path, self.dtype = str(path), dtype
        self.spec = MoeSpec.from_folder(path)
        self.hidden_size, self.ffn_size = self.spec.hidden_size, self.spec.ffn_size
        self._files = _key_index(Path(path))  # tensor name -> shard file
        self._handles: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._naming = self._find_naming()
        for decoder_layer in self.spec.moe_layers:  # every MoE layer has its experts, in the same naming
            for key in self._keys(decoder_layer, self.spec.num_experts - 1):
                if key not in self._files:
                    raise ValueError(f"{self.path!r}: MoE layer {decoder_layer} lacks {key!r}")

    def __getstate__(self) -> dict:
        return {"path": self.path, "dtype": self.dtype}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["dtype"])

    def __repr__(self) -> str:
        s = self.spec
        return (f"HFCheckpointSource({self.path!r}, {s.model_type}, layers={list(s.moe_layers)}, "
                f"experts={s.num_experts}, hidden={self.hidden_size}, ffn={self.ffn_size}, naming={self.naming})")

    @property
    def naming(self) -> str:
        """``"per_expert"``, ``"fused"`` ([E, 2I, H]) or ``"fused_t"`` ([E, H, 2I]), with the block name."""
        kind, block, _ = self._naming
        return f"{kind}:{block}"

    @property
    def num_layers(self) -> int:
        return self.spec.num_layers

    @property
    def num_experts(self) -> int:
        return self.spec.num_experts

    def _find_naming(self) -> tuple[str, str, tuple[str, ...]]:
        """(kind, block, projection names) of the experts of the first MoE layer."""
        first = self.spec.moe_layers[0]
        for block in _BLOCKS:
            base = f"model.layers.{first}.{block}.experts"
            for projs in _PER_EXPERT:
                if f"{base}.0.{projs[0]}.weight" in self._files:
                    return "per_expert", block, projs
            fused = next((s for s in ("", ".weight") if f"{base}.gate_up_proj{s}" in self._files), None)
            if fused is not None:
                names = (f"gate_up_proj{fused}", f"down_proj{fused}")
                return self._fused_kind(f"{base}.{names[0]}", f"{base}.{names[1]}"), block, names
        raise ValueError(f"{self.path!r}: no routed experts of decoder layer {first} in a known naming "
                         f"(looked for model.layers.{first}.{{{','.join(_BLOCKS)}}}.experts...)")

    def _fused_kind(self, gate_up: str, down: str) -> str:
        e, h, i = self.spec.num_experts, self.hidden_size, self.ffn_size
        got = (tuple(self._shape(gate_up)), tuple(self._shape(down)))
        if got == ((e, 2 * i, h), (e, h, i)):
            return "fused"
        if got == ((e, h, 2 * i), (e, i, h)):
            return "fused_t"
        raise ValueError(f"fused experts {gate_up} {got[0]}, {down} {got[1]} fit neither [E, 2I, H] + [E, H, I] nor "
                         f"[E, H, 2I] + [E, I, H] with E={e}, H={h}, I={i}")

    def _keys(self, decoder_layer: int, expert: int) -> list[str]:
        kind, block, names = self._naming
        base = f"model.layers.{decoder_layer}.{block}.experts"
        if kind == "per_expert":
            return [f"{base}.{expert}.{p}.weight" for p in names]
        return [f"{base}.{p}" for p in names]

    def _handle(self, key: str) -> Any:
        from safetensors import safe_open

        f = self._files[key]
        with self._lock:
            if f not in self._handles:
                self._handles[f] = safe_open(f, framework="pt")
            return self._handles[f]

    def _shape(self, key: str) -> list[int]:
        return self._handle(key).get_slice(key).get_shape()

    def expert(self, layer: int, expert: int) -> torch.Tensor:
        """Packed ``[3, I, H]`` weights of routed ``expert`` in our MoE ``layer``."""
        if not 0 <= layer < self.spec.num_layers:
            raise ValueError(f"layer={layer} is outside the {self.spec.num_layers} MoE layers")
        if not 0 <= expert < self.spec.num_experts:
            raise ValueError(f"expert={expert} is outside [0, {self.spec.num_experts})")
        keys = self._keys(self.spec.moe_layers[layer], expert)
        kind, i = self._naming[0], self.ffn_size
        if kind == "per_expert":
            gate, up, down = (self._handle(k).get_tensor(k) for k in keys)
        else:
            gate_up = self._handle(keys[0]).get_slice(keys[0])[expert]  # [2I, H] or [H, 2I]: this expert only
            down = self._handle(keys[1]).get_slice(keys[1])[expert]  # [H, I] or [I, H]
            if kind == "fused_t":
                gate_up, down = gate_up.T, down.T
            gate, up = gate_up[:i], gate_up[i:]
        w = pack(gate, up, down)  # [3, I, H]
        return w if self.dtype is None else w.to(self.dtype)


def _key_index(folder: Path) -> dict[str, str]:
    """Tensor name -> shard path, from ``model.safetensors.index.json`` or the shards' headers."""
    from safetensors import safe_open

    if not folder.is_dir():
        raise ValueError(f"{str(folder)!r} is not a folder")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no weight_map")
        return {k: str(folder / v) for k, v in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no .safetensors file in {str(folder)!r}")
    out: dict[str, str] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            out.update({k: str(f) for k in h.keys()})
    return out
