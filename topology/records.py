"""Engine records in and out: expert loads and placements in the files SGLang, vLLM/DeepSeek and ray-eplb use.

This is the project's interchange layer (file I/O, no Ray). Every reader checks what it reads and
raises a one-line ``ValueError`` that names the file and the bad key or shape.

Loads (``read_loads`` returns ``[T, L, E]`` float64: windows x MoE layers x logical experts):

* ``.pt``: a ``torch.save`` dict from SGLang's expert-distribution recorder in ``stat`` mode
  (``/dump_expert_distribution_record``), read with ``weights_only=True``. Key ``logical_count``:
  integer ``[T, L, E]`` (one row per buffered forward pass) or ``[L, E]``. Other keys (``rank``,
  ``average_utilization_rate_over_window``) are ignored. SGLang counts every decoder layer, so a
  model with dense first layers (DeepSeek's ``first_k_dense_replace``) has all-zero rows for them;
  they are kept, because SGLang's placement files need the same rows. With a finite
  ``--expert-distribution-recorder-buffer-size`` the ``T`` rows are a ring, not in time order.
* ``.npz``: a ray-eplb trace (``load`` float64 ``[T, L, E]``; ``model``, ``dataset``, ``source``,
  ``note`` strings), the format of the project's real traces.
* ``.json``: the ray-eplb loads document::

      {"format": "ray-eplb-loads", "version": 1, "load": [[[...]]], "model": "...", "note": "..."}

  ``load`` is a rectangular nested list of finite numbers >= 0, ``[T][L][E]`` or ``[L][E]`` (one
  window), with ``T, L, E >= 1``; ``model`` and ``note`` are optional strings. A JSON object with
  SGLang's ``logical_count`` key (what ``--init-expert-location`` accepts) is read as well.

Placements (``write_placement`` / ``read_placement``; ``phy2log [L, R]`` is the logical expert of
each of the ``R`` slots, GPU ``g`` holding slots ``[g*R/G, (g+1)*R/G)``):

* ``sglang-json`` / ``sglang-pt``: SGLang's ``--init-expert-location FILE`` with exactly one key,
  ``physical_to_logical_map`` int64 ``[L, R]`` (SGLang passes the keys on as keyword arguments,
  so there is nothing else in the file). ``R`` = logical experts + ``--ep-num-redundant-experts``
  and a multiple of the EP size; ``L`` = the model's decoder layers as SGLang counts them.
* ``triple``: the DeepSeek EPLB / vLLM tensors in one ``torch.save`` dict: ``phy2log [L, R]``,
  ``log2phy [L, E, R-E+1]`` (``-1`` padded), ``logcnt [L, E]``, all int64.
* ``ours``: JSON ``{"format": "ray-eplb-placement", "version": 1, "epoch": int,
  "topology": {Topology fields}, "phy2log": [[...]]}``; the other maps are derived from ``phy2log``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ray_eplb.topology.placement import Placement
from ray_eplb.topology.shape import Topology

LOADS_FORMAT = "ray-eplb-loads"
PLACEMENT_FORMAT = "ray-eplb-placement"
VERSION = 1
LOAD_FORMATS = ("ours", "npz", "sglang")
PLACEMENT_FORMATS = ("ours", "sglang-json", "sglang-pt", "triple")
SGLANG_KEY = "physical_to_logical_map"
TRIPLE_KEYS = ("phy2log", "log2phy", "logcnt")


def _fail(path: Path, what: str) -> ValueError:
    return ValueError(f"{path}: {what}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _torch_load(path: Path) -> dict:
    """A ``torch.save`` dict, tensors on the CPU (SGLang saves them on its GPU), no pickled code."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 -- unpickling refused, truncated file, not a torch file at all
        raise _fail(path, f"not a torch.save file readable with weights_only=True ({_first_line(exc)})") from None
    if not isinstance(data, dict):
        raise _fail(path, f"holds a {type(data).__name__}, expected a dict")
    return data


def _json_load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise _fail(path, f"not valid JSON ({exc.msg} at line {exc.lineno})") from None


def _array(path: Path, key: str, value: Any, *, integer: bool) -> np.ndarray:
    """``value`` (tensor, array or nested list) as a numpy array of real numbers, or a ValueError naming ``key``."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bool or value.is_complex():
            raise _fail(path, f"key {key!r} has dtype {value.dtype}, expected {'int' if integer else 'a real dtype'}")
        arr = value.numpy()
    else:
        try:
            arr = np.asarray(value)
        except ValueError:
            raise _fail(path, f"key {key!r} is not a rectangular array") from None
    if arr.dtype.kind not in "iuf":
        raise _fail(path, f"key {key!r} is not a rectangular array of numbers (got dtype {arr.dtype})")
    if integer and arr.dtype.kind == "f":
        raise _fail(path, f"key {key!r} has dtype {arr.dtype}, expected integers")
    return arr


def _check_loads(path: Path, key: str, arr: np.ndarray) -> torch.Tensor:
    """``[T, L, E]`` or ``[L, E]`` finite, >= 0 -> ``[T, L, E]`` float64 tensor."""
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or 0 in arr.shape:
        raise _fail(path, f"key {key!r} has shape {tuple(arr.shape)}, expected [T, L, E] or [L, E], all >= 1")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise _fail(path, f"key {key!r} holds a NaN or infinite load")
    if (arr < 0).any():
        raise _fail(path, f"key {key!r} holds a negative load ({arr.min()})")
    return torch.from_numpy(np.ascontiguousarray(arr))


def read_loads(path: str | Path) -> torch.Tensor:
    """Expert loads ``[T, L, E]`` float64 from a SGLang dump (``.pt``), a trace (``.npz``) or JSON.

    See the module docstring for each format. Raises ``ValueError`` on a malformed file.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth"):
        data = _torch_load(path)
        if "logical_count" not in data:
            hint = ""
            if "records" in data:
                hint = " (a per_token recorder dump: record in 'stat' mode)"
            elif SGLANG_KEY in data or "phy2log" in data:
                hint = " (this is a placement, not loads)"
            raise _fail(path, f"key 'logical_count' missing{hint}; keys: {sorted(map(str, data))}")
        return _check_loads(path, "logical_count", _array(path, "logical_count", data["logical_count"], integer=False))
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files if k == "load"}
                keys = sorted(npz.files)
        except FileNotFoundError:
            raise
        except Exception as exc:  # noqa: BLE001 -- not a zip, truncated, pickled objects refused
            raise _fail(path, f"not a readable .npz file ({_first_line(exc)})") from None
        if "load" not in arrays:
            raise _fail(path, f"key 'load' missing; keys: {keys}")
        return _check_loads(path, "load", _array(path, "load", arrays["load"], integer=False))
    if suffix == ".json":
        data = _json_load(path)
        if not isinstance(data, dict):
            raise _fail(path, f"holds a JSON {type(data).__name__}, expected an object")
        if "logical_count" in data and "format" not in data:
            return _check_loads(path, "logical_count", _array(path, "logical_count", data["logical_count"], integer=False))
        if data.get("format") != LOADS_FORMAT:
            raise _fail(path, f"key 'format' is {data.get('format')!r}, expected {LOADS_FORMAT!r}")
        if "load" not in data:
            raise _fail(path, "key 'load' missing")
        return _check_loads(path, "load", _array(path, "load", data["load"], integer=False))
    raise _fail(path, f"unknown loads file type {suffix!r}: expected .pt (SGLang), .npz or .json")


def select_window(loads: torch.Tensor, window: str | int = "all") -> torch.Tensor:
    """Loads to plan on, ``[L, E]``, from ``loads [T, L, E]``.

    ``window``: ``"all"`` (sum of every window), ``"last"`` (the last one) or a count ``N`` (sum of
    the last ``N``; ``"3"`` or ``3``).
    """
    if loads.dim() != 3:
        raise ValueError(f"loads has shape {tuple(loads.shape)}, expected [T, L, E]")
    if window == "all":
        return loads.sum(0)
    if window == "last":
        return loads[-1].clone()
    try:
        count = int(window)
    except (TypeError, ValueError):
        raise ValueError(f"window={window!r} must be 'all', 'last' or a positive number of windows") from None
    if not 1 <= count <= loads.shape[0]:
        raise ValueError(f"window={count} must be between 1 and the {loads.shape[0]} windows in the file")
    return loads[-count:].sum(0)


def write_loads(path: str | Path, load: torch.Tensor, fmt: str = "ours", **meta: str) -> None:
    """Write loads ``[T, L, E]`` or ``[L, E]`` as ``fmt``: ``"ours"`` (JSON), ``"npz"`` or ``"sglang"``.

    ``"sglang"`` is a ``.pt`` dict ``{"logical_count": int64 [T, L, E]}`` (loads rounded to whole
    tokens), readable by SGLang's ``--init-expert-location`` (which then solves with its own
    EPLB) and by :func:`read_loads`. ``meta``: strings kept in the file (``model``, ``note``...;
    JSON and npz only).
    """
    path = Path(path)
    arr = _check_loads(path, "load", _array(path, "load", load, integer=False)).numpy()  # [T, L, E]
    if fmt == "ours":
        doc = {"format": LOADS_FORMAT, "version": VERSION, **{k: str(v) for k, v in meta.items()}}
        doc["load"] = [[[_num(x) for x in row] for row in layer] for layer in arr.tolist()]
        path.write_text(json.dumps(doc, separators=(",", ":")))
    elif fmt == "npz":
        with path.open("wb") as fh:  # a file handle: numpy would append .npz to another suffix
            np.savez(fh, load=arr, **{k: np.str_(v) for k, v in meta.items()})
    elif fmt == "sglang":
        torch.save({"logical_count": torch.from_numpy(np.rint(arr).astype(np.int64))}, path)
    else:
        raise ValueError(f"fmt={fmt!r} is not one of {LOAD_FORMATS}")


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() and abs(x) < 2**53 else x


def _phy2log(path: Path, key: str, value: Any) -> torch.Tensor:
    arr = _array(path, key, value, integer=True)
    if arr.ndim != 2 or 0 in arr.shape:
        raise _fail(path, f"key {key!r} has shape {tuple(arr.shape)}, expected [L, R] with L, R >= 1")
    if arr.min() < 0:
        raise _fail(path, f"key {key!r} holds a negative expert id ({arr.min()})")
    return torch.from_numpy(arr.astype(np.int64))


def read_phy2log(path: str | Path) -> tuple[torch.Tensor, Topology | None, int]:
    """The slot map of any placement file: ``(phy2log [L, R] int64, topology or None, epoch)``.

    Only ``ours`` carries a topology and an epoch (else ``None`` and 0). The format is told by
    the content: ``ours`` by its ``format`` key, SGLang by ``physical_to_logical_map``, the
    triple by ``phy2log`` (its ``log2phy`` and ``logcnt`` must then agree with ``phy2log``).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth"):
        data = _torch_load(path)
    elif suffix == ".json":
        data = _json_load(path)
        if not isinstance(data, dict):
            raise _fail(path, f"holds a JSON {type(data).__name__}, expected an object")
    else:
        raise _fail(path, f"unknown placement file type {suffix!r}: expected .json or .pt")
    if data.get("format") == PLACEMENT_FORMAT:
        if "phy2log" not in data or "topology" not in data:
            raise _fail(path, f"key {'phy2log' if 'phy2log' not in data else 'topology'!r} missing")
        try:
            topology = Topology(**data["topology"])
        except (TypeError, ValueError) as exc:
            raise _fail(path, f"key 'topology' is not a valid topology ({error_line(exc)})") from None
        epoch = data.get("epoch", 0)
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise _fail(path, f"key 'epoch' is {epoch!r}, expected an int >= 0")
        return _phy2log(path, "phy2log", data["phy2log"]), topology, epoch
    if SGLANG_KEY in data:
        return _phy2log(path, SGLANG_KEY, data[SGLANG_KEY]), None, 0
    if "phy2log" in data:
        phy2log = _phy2log(path, "phy2log", data["phy2log"])
        _check_triple(path, data, phy2log)
        return phy2log, None, 0
    hint = " (these are loads, not a placement)" if "logical_count" in data or "load" in data else ""
    raise _fail(path, f"key {SGLANG_KEY!r} or 'phy2log' missing{hint}; keys: {sorted(map(str, data))}")


def _check_triple(path: Path, data: dict, phy2log: torch.Tensor) -> None:
    missing = [k for k in TRIPLE_KEYS if k not in data]
    if missing:
        raise _fail(path, f"key {missing[0]!r} missing (a triple holds {', '.join(TRIPLE_KEYS)})")
    logcnt = torch.from_numpy(_array(path, "logcnt", data["logcnt"], integer=True).astype(np.int64))
    if logcnt.dim() != 2 or logcnt.shape[0] != phy2log.shape[0]:
        raise _fail(path, f"key 'logcnt' has shape {tuple(logcnt.shape)}, expected [{phy2log.shape[0]}, E]")
    from ray_eplb.solver.maps import logical_maps

    try:
        log2phy, want_cnt = logical_maps(phy2log, logcnt.shape[1])
    except ValueError as exc:
        raise _fail(path, f"key 'phy2log' does not fit logcnt's {logcnt.shape[1]} experts ({exc})") from None
    if not torch.equal(want_cnt, logcnt):
        raise _fail(path, "key 'logcnt' does not match phy2log")
    got = torch.from_numpy(_array(path, "log2phy", data["log2phy"], integer=True).astype(np.int64))
    if got.shape != log2phy.shape:
        raise _fail(path, f"key 'log2phy' has shape {tuple(got.shape)}, expected {tuple(log2phy.shape)}")
    # Replicas of one expert in any order (DeepSeek's solver lists them by replica rank, not by slot).
    if not torch.equal(got.sort(-1).values, log2phy.sort(-1).values):
        raise _fail(path, "key 'log2phy' does not invert phy2log")


def error_line(exc: BaseException) -> str:
    """One line for an error: pydantic's field and message (not its multi-line report), else the first line."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        parts = []
        for e in errors():
            msg = str(e["msg"]).removeprefix("Value error, ")
            parts.append(f"{'.'.join(map(str, e['loc']))}: {msg}" if e["loc"] else msg)
        return "; ".join(parts)
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror or exc}"
    return _first_line(exc)


def read_placement(path: str | Path, topology: Topology | None = None) -> Placement:
    """A :class:`Placement` from any placement file.

    ``topology``: needed for files without one (SGLang, triple); for ``ours`` files, when given,
    it must equal the file's. Raises ``ValueError`` naming what does not fit.
    """
    path = Path(path)
    phy2log, found, epoch = read_phy2log(path)
    if found is not None and topology is not None and found != topology:
        diff = [k for k, v in found.model_dump().items() if getattr(topology, k) != v]
        raise _fail(path, f"topology differs from the one asked for in {', '.join(diff)}")
    topology = topology or found
    if topology is None:
        raise _fail(path, "holds no topology (SGLang or triple file): pass one")
    want = (topology.num_layers, topology.num_slots)
    if tuple(phy2log.shape) != want:
        raise _fail(path, f"phy2log has shape {tuple(phy2log.shape)}, the topology needs {want} [L, R]")
    if int(phy2log.max()) >= topology.num_experts:
        raise _fail(path, f"phy2log holds expert {int(phy2log.max())}, the topology has {topology.num_experts}")
    try:
        return Placement.from_phy2log(topology, phy2log, epoch)
    except ValueError as exc:
        raise _fail(path, error_line(exc)) from None


def write_placement(path: str | Path, placement: Placement, fmt: str = "ours") -> None:
    """Write ``placement`` as ``fmt`` (one of :data:`PLACEMENT_FORMATS`; see the module docstring)."""
    path = Path(path)
    phy2log = placement.phy2log.detach().cpu().to(torch.int64).contiguous()
    if fmt == "ours":
        doc = {"format": PLACEMENT_FORMAT, "version": VERSION, "epoch": placement.epoch,
               "topology": placement.topology.model_dump(), "phy2log": phy2log.tolist()}
        path.write_text(json.dumps(doc, separators=(",", ":")))
    elif fmt == "sglang-json":
        path.write_text(json.dumps({SGLANG_KEY: phy2log.tolist()}, separators=(",", ":")))
    elif fmt == "sglang-pt":
        torch.save({SGLANG_KEY: phy2log}, path)
    elif fmt == "triple":
        torch.save({"phy2log": phy2log, "log2phy": placement.log2phy.detach().cpu().to(torch.int64).contiguous(),
                    "logcnt": placement.logcnt.detach().cpu().to(torch.int64).contiguous()}, path)
    else:
        raise ValueError(f"fmt={fmt!r} is not one of {PLACEMENT_FORMATS}")


def format_for(path: str | Path, fmt: str) -> str:
    """Resolve ``"sglang"`` to ``"sglang-pt"`` or ``"sglang-json"`` by the suffix of ``path``."""
    if fmt != "sglang":
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix in (".pt", ".pth"):
        return "sglang-pt"
    if suffix == ".json":
        return "sglang-json"
    raise ValueError(f"format 'sglang' needs an output ending in .json or .pt, got {str(path)!r}")

