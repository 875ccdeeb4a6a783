"""PNG plots of a balancer's history (matplotlib, no display needed):

- **balancedness over time**: one point per control round (mean over max GPU load on the recent
  window), a vertical marker per committed rebalance labelled with its epoch, bars of the bytes it
  moved on a second axis, a red marker per aborted one;
- **per-layer x per-GPU load** before and after a rebalance, on the forecast it was solved for
  (one heatmap each: every cell is the GPU's load over its layer's mean, 1 = even; one colour scale).

Inputs are what the controller returns: ``timeline()`` samples, ``history()`` records and
``rebalance_loads()`` entries (``before`` / ``after``: ``[L, G]`` nested lists).
"""
from __future__ import annotations

import os
import time
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_timeline(ax: Any, timeline: list[dict], history: list[dict]) -> None:
    """Balancedness per round on ``ax``, with rebalance markers and bytes moved."""
    t0 = min([s["time"] for s in timeline] + [h["time"] for h in history if "time" in h] + [time.time()])
    pts = [(s["time"] - t0, s["balancedness_now"]) for s in timeline if s.get("balancedness_now") is not None]
    if pts:
        ax.plot(*zip(*pts), color="tab:blue", marker=".", lw=1.2, label="balancedness (measured, recent window)")
    committed = [h for h in history if h.get("action") == "committed"]
    aborted = [h for h in history if h.get("action") == "aborted"]
    for h in committed:
        ax.axvline(h["time"] - t0, color="tab:green", ls="--", lw=1)
        ax.annotate(f"epoch {h['epoch']}", (h["time"] - t0, 1.0), xytext=(2, -10), textcoords="offset points",
                    fontsize=7, color="tab:green", rotation=90, va="top")
    for h in aborted:
        ax.axvline(h["time"] - t0, color="tab:red", ls=":", lw=1)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("seconds since the first round shown")
    ax.set_ylabel("balancedness (mean / max GPU load)")
    ax.grid(alpha=0.3)
    if committed:
        ax2 = ax.twinx()
        span = max([p[0] for p in pts] + [h["time"] - t0 for h in committed] + [1.0])
        ax2.bar([h["time"] - t0 for h in committed], [h.get("bytes_moved", 0) / 2**20 for h in committed],
                width=span / 80, color="tab:green", alpha=0.35, label="MiB moved by the rebalance")
        ax2.set_ylabel("MiB moved")
        ax2.legend(loc="lower right", fontsize=8)
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title(f"balancedness over {len(timeline)} rounds: {len(committed)} rebalances, {len(aborted)} aborted")


def plot_heatmaps(axes: Any, entry: dict) -> Any:
    """Two heatmaps (``axes[0]`` before, ``axes[1]`` after) of ``entry``'s ``[L, G]`` loads, each cell
    the GPU's load over its layer's mean (1 = even; one colour scale for both); returns the image."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    before, after = np.asarray(entry["before"], dtype=float), np.asarray(entry["after"], dtype=float)

    def relative(data: Any) -> Any:
        mean = data.mean(axis=1, keepdims=True)
        return np.where(mean > 0, data / np.maximum(mean, 1e-300), 1.0)

    rel_b, rel_a = relative(before), relative(after)
    top = max(float(rel_b.max(initial=1.0)), float(rel_a.max(initial=1.0)), 1.05)
    img = None
    for ax, data, rel, title in ((axes[0], before, rel_b, f"epoch {entry['from_epoch']} (before)"),
                                 (axes[1], after, rel_a, f"epoch {entry['epoch']} (after)")):
        img = ax.imshow(rel, aspect="auto", cmap="RdYlBu_r", vmin=2.0 - top, vmax=top, interpolation="nearest")
        peak = data.max(axis=1)
        whole = data.mean(axis=1).sum() / max(peak.sum(), 1e-300)
        ax.set_title(f"{title}: balancedness {whole:.3f}", fontsize=9)
        ax.set_xlabel("GPU (rank)")
        ax.set_ylabel("MoE layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        if data.shape[0] * data.shape[1] <= 256:  # small enough to print each cell
            for (layer, gpu), v in np.ndenumerate(rel):
                ax.text(gpu, layer, f"{v:.2f}", ha="center", va="center", fontsize=6)
    return img


def history_figure(timeline: list[dict], history: list[dict], loads: list[dict], png: str | os.PathLike) -> str:
    """One PNG: balancedness over time on top and, when a rebalance was kept, the per-layer x
    per-GPU load before and after the last one below. Returns the path."""
    plt = _pyplot()
    if loads:
        fig = plt.figure(figsize=(11, 8.5))
        grid = fig.add_gridspec(2, 2, height_ratios=[1, 1.1], hspace=0.35, wspace=0.25)
        plot_timeline(fig.add_subplot(grid[0, :]), timeline, history)
        axes = [fig.add_subplot(grid[1, 0]), fig.add_subplot(grid[1, 1])]
        img = plot_heatmaps(axes, loads[-1])
        fig.colorbar(img, ax=axes, label="GPU load / layer mean (forecast)", shrink=0.9)
    else:
        fig, ax = plt.subplots(figsize=(11, 4.5))
        plot_timeline(ax, timeline, history)
    fig.savefig(png, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return str(png)


def write_plots(out_dir: str | os.PathLike, timeline: list[dict], history: list[dict], loads: list[dict]) -> list[str]:
    """``balancedness.png`` and, when a rebalance was kept, ``gpu_load_heatmap.png`` in ``out_dir``
    (created); returns the paths written."""
    plt = _pyplot()
    os.makedirs(out_dir, exist_ok=True)
    written = []
    fig, ax = plt.subplots(figsize=(11, 4.5))
    plot_timeline(ax, timeline, history)
    path = os.path.join(out_dir, "balancedness.png")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    written.append(path)
    if loads:
        fig, axes = plt.subplots(1, 2, figsize=(11, 5), gridspec_kw={"wspace": 0.25})
        img = plot_heatmaps(axes, loads[-1])
        fig.colorbar(img, ax=list(axes), label="GPU load / layer mean (forecast)", shrink=0.9)
        path = os.path.join(out_dir, "gpu_load_heatmap.png")
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written
