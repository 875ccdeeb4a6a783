"""Expert-load workloads for the benchmark and the demo: real traces, or a built-in synthetic one.

Real traces live outside the project (``../shared/traces/NAME.npz``; format in that folder's README:
``load`` float64 ``[T, L, E]`` tokens per window, layer and logical expert). A user's machine has no
such folder: :func:`load_workload`, asked for no trace in particular, then falls back to
:func:`synthetic_trace` and says so.

The synthetic workload is shaped like the real ones: per layer, expert popularity follows a Zipf
law (exponent ``skew``, hottest expert ~5-10x the mean) over a random permutation of the experts;
from window to window the log-popularities take a Gaussian random walk (``drift``), and every
``shift_every`` windows two random experts of each layer swap popularity (an abrupt shift, as
when the request mix changes). Counts are drawn multinomially: ``tokens`` routed tokens per layer
per window, each token to ``top_k`` experts.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DEFAULT_TRACE = "dsv2lite_puffin"


@dataclass(frozen=True)
class Trace:
    """A load trace. ``load``: ``[T, L, E]`` float64 tokens per (window, layer, logical expert)."""

    name: str
    load: torch.Tensor
    model: str = ""
    synthetic: bool = False
    top_k: int = 0  # 0 when unknown

    @property
    def static(self) -> bool:
        return self.load.shape[0] == 1


def default_traces_dir() -> Path | None:
    """``$RAY_EPLB_TRACES`` (an error if set to a missing folder), else ``../shared/traces`` beside
    the working directory or beside the checkout; ``None`` when there is none."""
    env = os.environ.get("RAY_EPLB_TRACES")
    if env:  # an explicit setting is used or reported, never silently replaced
        if not Path(env).is_dir():
            raise FileNotFoundError(f"RAY_EPLB_TRACES={env!r} is not a directory")
        return Path(env)
    candidates = [Path.cwd().parent / "shared" / "traces", Path(__file__).resolve().parents[2] / "shared" / "traces"]
    for c in candidates:
        if c.is_dir():
            return c
    return None


def available_traces(traces_dir: str | os.PathLike | None = None) -> list[str]:
    """Names of the ``.npz`` traces in ``traces_dir`` (default :func:`default_traces_dir`), sorted."""
    base = Path(traces_dir) if traces_dir is not None else default_traces_dir()
    return sorted(p.stem for p in base.glob("*.npz")) if base is not None and base.is_dir() else []


def load_trace(name_or_path: str | os.PathLike, traces_dir: str | os.PathLike | None = None) -> Trace:
    """Read a trace ``.npz`` given by path, or by name inside ``traces_dir``.

    The file must hold an array ``load``: real numbers (float, or integer counts), ``[T, L, E]``,
    non-empty, finite and non-negative; it is returned as float64. Raises ``FileNotFoundError``
    naming where it looked (and the traces there), ``ValueError`` (one line, naming the file) for
    anything else: not an ``.npz`` archive, no ``load``, wrong rank, dtype or values.
    """
    p = Path(name_or_path)
    if p.suffix != ".npz" or not p.exists():
        base = Path(traces_dir) if traces_dir is not None else default_traces_dir()
        if base is None:
            raise FileNotFoundError(f"trace {str(name_or_path)!r}: no traces folder found (set RAY_EPLB_TRACES)")
        p = base / (p.name if p.suffix == ".npz" else f"{p.name}.npz")
        if not p.exists():
            names = available_traces(base)
            raise FileNotFoundError(f"trace {str(name_or_path)!r} not found: no {str(p)!r}; available in {str(base)!r}: "
                                    f"{', '.join(names) if names else '(none)'}")
    if not p.is_file():
        raise FileNotFoundError(f"trace file {str(p)!r} does not exist")
    load, model = _read_npz(p)
    if load.ndim != 3 or min(load.shape) == 0:
        raise ValueError(f"trace {str(p)!r}: 'load' must be [T, L, E] and non-empty, got shape {load.shape}")
    if not np.isfinite(load).all() or (load < 0).any():
        raise ValueError(f"trace {str(p)!r}: 'load' holds NaN, inf or negative values")
    return Trace(name=p.stem, load=torch.from_numpy(load), model=model)


def _read_npz(p: Path) -> tuple[np.ndarray, str]:
    """``(load as float64, model)`` from the archive at ``p``; ``ValueError`` (one line) when it is
    not a readable ``.npz`` or its ``load`` is not an array of real numbers."""
    import zipfile

    try:
        data = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile):
        raise ValueError(f"trace {str(p)!r} is not a readable .npz archive") from None
    if not isinstance(data, np.lib.npyio.NpzFile):  # a bare .npy renamed: an array, not an archive
        raise ValueError(f"trace {str(p)!r} is a single .npy array, not an .npz archive with a 'load' array")
    with data:
        if "load" not in data.files:
            raise ValueError(f"trace {str(p)!r} has no 'load' array (found {data.files})")
        try:
            raw = data["load"]
            model = str(data["model"]) if "model" in data.files else ""
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:  # pickled objects, a damaged member
            raise ValueError(f"trace {str(p)!r}: 'load' cannot be read ({' '.join(str(exc).split())})") from None
    if raw.dtype.kind not in "fiu":
        sample = raw.reshape(-1)[:1].tolist()
        raise ValueError(f"trace {str(p)!r}: 'load' is not numeric (dtype {raw.dtype}, e.g. {sample[0]!r})"
                         if sample else f"trace {str(p)!r}: 'load' is not numeric (dtype {raw.dtype})")
    return raw.astype(np.float64), model


def synthetic_trace(
    num_windows: int = 20,
    num_layers: int = 8,
    num_experts: int = 64,
    *,
    top_k: int = 6,
    tokens: int = 20_000,
    skew: float = 0.9,
    drift: float = 0.15,
    shift_every: int = 5,
    seed: int = 0,
) -> Trace:
    """The built-in skewed, drifting workload described in the module docstring. ``load``: ``[T, L, E]``."""
    rng = np.random.default_rng(seed)
    ranks = np.stack([rng.permutation(num_experts) for _ in range(num_layers)]) + 1  # [L, E]
    logp = -skew * np.log(ranks.astype(np.float64))  # [L, E]
    out = np.empty((num_windows, num_layers, num_experts))
    for t in range(num_windows):
        if t and shift_every and t % shift_every == 0:
            for layer in range(num_layers):
                a, b = rng.choice(num_experts, size=2, replace=False)
                logp[layer, [a, b]] = logp[layer, [b, a]]
        logp = logp + rng.normal(0.0, drift, size=logp.shape)
        p = np.exp(logp - logp.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        for layer in range(num_layers):
            out[t, layer] = rng.multinomial(tokens * top_k, p[layer])
    return Trace(name="synthetic", load=torch.from_numpy(out), model="synthetic", synthetic=True, top_k=top_k)


def load_workload(name_or_path: str | None = None, traces_dir: str | os.PathLike | None = None, **synthetic_kwargs) -> Trace:
    """The trace asked for (name or ``.npz`` path), or :data:`DEFAULT_TRACE` when none is asked for.

    Only when no trace is asked for and there is no traces folder at all is the synthetic workload
    used (with a printed notice); a trace asked for that cannot be found is a ``FileNotFoundError``
    listing the available ones.
    """
    if name_or_path is None:
        base = Path(traces_dir) if traces_dir is not None else default_traces_dir()
        if base is None or not base.is_dir():
            print(f"[ray-eplb] no traces folder found (set RAY_EPLB_TRACES) for the default trace {DEFAULT_TRACE!r}; "
                  "using the built-in synthetic workload (skewed Zipf, drifting)")
            return synthetic_trace(**synthetic_kwargs)
        return load_trace(DEFAULT_TRACE, base)
    return load_trace(name_or_path, traces_dir)


def sample_windows(table: torch.Tensor, num_windows: int, tokens_per_layer: int, seed: int = 0) -> torch.Tensor:
    """Draw windows from a static table: ``table [L, E]`` -> ``[num_windows, L, E]`` float64 counts.

    Each window routes ``tokens_per_layer`` tokens per layer multinomially from the layer's
    distribution (a layer with no load stays all-zero).
    """
    rng = np.random.default_rng(seed)
    t = table.detach().cpu().numpy().astype(np.float64)
    out = np.zeros((num_windows,) + t.shape)
    for layer in range(t.shape[0]):
        total = t[layer].sum()
        if total > 0:
            out[:, layer] = rng.multinomial(tokens_per_layer, t[layer] / total, size=num_windows)
    return torch.from_numpy(out)
