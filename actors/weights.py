"""Expert weights: where they come from (``WeightSource``) and how one expert computes (SwiGLU).

One expert is kept as a single *packed* tensor ``[3, I, H]`` (``I`` = FFN width, ``H`` = hidden size):

- ``packed[0]`` = ``gate_proj.weight`` ``[I, H]``
- ``packed[1]`` = ``up_proj.weight`` ``[I, H]``
- ``packed[2]`` = ``down_proj.weight.T`` ``[I, H]`` (``down_proj.weight`` is ``[H, I]``)

One tensor per expert means one object per expert in a transfer and one reference per slot in a
worker's table (unchanged slots are shared between epochs without a copy).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

PROJ_NAMES = ("gate_proj", "up_proj", "down_proj")
CHECKPOINT_KEY = "model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"


def swiglu(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """One expert's FFN: ``down(silu(gate(x)) * up(x))``, computed in the expert's dtype.

    Args:
        x: ``[N, H]`` tokens, any floating dtype.
        packed: ``[3, I, H]`` packed expert weights (see the module docstring).

    Returns:
        ``[N, H]`` in ``x``'s dtype (a bf16 expert serves float32 activations and the reverse).
    """
    xe = x.to(packed.dtype)  # [N, H]; no copy when the dtypes agree
    gate = xe @ packed[0].T  # [N, I]
    up = xe @ packed[1].T  # [N, I]
    return ((F.silu(gate) * up) @ packed[2]).to(x.dtype)  # [N, H]


def pack(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``gate [I, H]``, ``up [I, H]``, ``down [H, I]`` (checkpoint layout) -> packed ``[3, I, H]``."""
    if gate.shape != up.shape or down.shape != (gate.shape[1], gate.shape[0]):
        raise ValueError(
            f"projection shapes do not fit a SwiGLU expert: gate {tuple(gate.shape)}, up {tuple(up.shape)}, "
            f"down {tuple(down.shape)} (want gate=up=[I, H], down=[H, I])"
        )
    return torch.stack([gate, up, down.T])


@runtime_checkable
class WeightSource(Protocol):
    """Where a worker gets an expert's weights when no peer holds them (start-up, recovery)."""

    hidden_size: int
    ffn_size: int

    def expert(self, layer: int, expert: int) -> torch.Tensor:
        """Packed weights ``[3, I, H]`` (cpu, in the source's dtype) of logical ``expert`` in MoE ``layer``."""
        ...


class SyntheticWeightSource:
    """Deterministic weights: each (layer, logical expert) has its own seeded generator.

    Any slot's identity can therefore be verified by regenerating the expected weights and
    comparing exactly. Picklable and cheap to ship to actors (it holds no tensors).
    """

    def __init__(self, hidden_size: int = 64, ffn_size: int = 128, seed: int = 0, dtype: torch.dtype = torch.float32):
        if hidden_size <= 0 or ffn_size <= 0:
            raise ValueError(f"hidden_size={hidden_size} and ffn_size={ffn_size} must be positive")
        self.hidden_size = int(hidden_size)
        self.ffn_size = int(ffn_size)
        self.seed = int(seed)
        self.dtype = dtype

    def _seed(self, layer: int, expert: int) -> int:
        # Integer mixing (not Python's hash): the same on every process and run.
        return ((self.seed * 1_000_003 + layer) * 1_000_003 + expert) % (2**62)

    def expert(self, layer: int, expert: int) -> torch.Tensor:
        if layer < 0 or expert < 0:
            raise ValueError(f"layer={layer} and expert={expert} must be non-negative")
        gen = torch.Generator().manual_seed(self._seed(layer, expert))
        h, i = self.hidden_size, self.ffn_size
        w = torch.randn(3, i, h, generator=gen, dtype=torch.float32)  # [3, I, H]
        w[:2] *= h**-0.5
        w[2] *= i**-0.5
        return w.to(self.dtype)

    def __repr__(self) -> str:
        return f"SyntheticWeightSource(hidden={self.hidden_size}, ffn={self.ffn_size}, seed={self.seed})"


class SafetensorsWeightSource:
    """Expert weights from ``*.safetensors`` files with the usual HF naming
    ``model.layers.{l}.mlp.experts.{e}.{gate_proj,up_proj,down_proj}.weight``.

    ``path`` is one file or a folder of files. Tensors are read lazily, one expert at a time,
    so a worker reads only the experts of its own slots. The file handles are opened per process
    (the object pickles as its path).
    """

    def __init__(self, path: str | os.PathLike):
        p = Path(path)
        files = sorted(p.glob("*.safetensors")) if p.is_dir() else [p]
        if not files or not all(f.is_file() for f in files):
            raise ValueError(f"no .safetensors file at {str(p)!r}")
        self.path = str(p)
        self._files = [str(f) for f in files]
        self._index: dict[str, str] | None = None
        gate = self._get(CHECKPOINT_KEY.format(layer=0, expert=0, proj="gate_proj"))
        self.ffn_size, self.hidden_size = (int(d) for d in gate.shape)

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    def _get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        if self._index is None:
            self._index = {}
            for f in self._files:
                with safe_open(f, framework="pt") as h:
                    self._index.update({k: f for k in h.keys()})
        if key not in self._index:
            raise KeyError(f"tensor {key!r} is not in the checkpoint {self.path!r}")
        with safe_open(self._index[key], framework="pt") as h:
            return h.get_tensor(key)

    def expert(self, layer: int, expert: int) -> torch.Tensor:
        gate, up, down = (self._get(CHECKPOINT_KEY.format(layer=layer, expert=expert, proj=p)) for p in PROJ_NAMES)
        return pack(gate, up, down)

    def __repr__(self) -> str:
        return f"SafetensorsWeightSource({self.path!r}, hidden={self.hidden_size}, ffn={self.ffn_size})"


def write_checkpoint(path: str | os.PathLike, source: WeightSource, num_layers: int, num_experts: int) -> Path:
    """Write every expert of ``source`` to one safetensors file at ``path`` (HF naming); returns the path."""
    from safetensors.torch import save_file

    tensors = {}
    for layer in range(num_layers):
        for e in range(num_experts):
            w = source.expert(layer, e)  # [3, I, H]
            parts = (w[0], w[1], w[2].T)
            for proj, t in zip(PROJ_NAMES, parts):
                tensors[CHECKPOINT_KEY.format(layer=layer, expert=e, proj=proj)] = t.contiguous()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(p))
    return p
