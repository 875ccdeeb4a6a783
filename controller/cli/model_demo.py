"""``ray-eplb demo --model DIR``: a local Hugging Face MoE model generating text through ray-eplb.

The model (``config.json`` + safetensors in ``DIR``; ``ray-eplb tiny-model DIR`` writes a tiny one)
runs in this process with its own gates, attention and shared experts; its routed experts run on
one Ray worker actor per rank, loaded from ``DIR`` (:mod:`ray_eplb.actors.hf_attach`). The
controller counts what the workers serve and rebalances on its own loop while the model generates.

Traffic is skewed by prompt mix: the built-in prompts fall in :data:`PROMPT_GROUPS` (code, numbers,
prose) that route differently, and the run goes through ``--phases`` phases, phase ``p`` drawing
``--skew`` of its prompts from group ``p mod 3`` and the rest from all prompts. Each phase lasts
``--windows-per-phase`` windows of at least ``--interval`` seconds, one generated batch each.

The reference is the unpatched model loaded from the same folder: every greedily generated token is
compared with its token at the same position. A folder without a tokenizer gets byte-level ids
(:func:`~ray_eplb.actors.hf_tiny.encode`). The cluster and its token authentication are those of
``ray-eplb demo`` (:func:`ray_eplb.controller.cli.cluster.start_cluster`).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

PROMPT_GROUPS = {
    "code": ["def add(a, b): return a + b", "for (int i = 0; i < n; ++i) { sum += x[i]; }",
             "import numpy as np; x = np.zeros((3, 4))", "SELECT name FROM users WHERE id = 7;"],
    "numbers": ["3 + 4 = 7, 12 * 12 = 144, 2 ** 10 = 1024", "0.5 0.25 0.125 0.0625 0.03125",
                "1, 1, 2, 3, 5, 8, 13, 21, 34, 55", "2026-12-01 18:05:00 +0000"],
    "prose": ["The quick brown fox jumps over the lazy dog.", "Once upon a time there was a small village.",
              "Mixture-of-experts models route each token to a few experts.", "Please summarise the meeting notes."],
}


def parse(argv: list[str]) -> argparse.Namespace:
    from ray_eplb.controller.cli.args import Parser, nonneg_int, number, positive, positive_int

    ap = Parser(prog="ray-eplb demo --model", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, metavar="DIR", help="local Hugging Face MoE folder (config.json + safetensors)")
    ap.add_argument("--workers", type=positive_int, default=4, help="expert-parallel ranks (default 4)")
    ap.add_argument("--nodes", type=positive_int, default=2, help="raylets to start; ranks are split evenly (default 2)")
    ap.add_argument("--slots-per-gpu", type=nonneg_int, default=0, help="default ceil(experts / workers) + 1")
    ap.add_argument("--phases", type=positive_int, default=3, help="traffic phases, each favouring one prompt group (default 3)")
    ap.add_argument("--windows-per-phase", type=positive_int, default=4, help="generated batches per phase (default 4)")
    ap.add_argument("--batch", type=positive_int, default=8, help="prompts per generated batch (default 8)")
    ap.add_argument("--prompt-tokens", type=positive_int, default=16, help="prompt length without a tokenizer (default 16)")
    ap.add_argument("--new-tokens", type=positive_int, default=16, help="tokens generated per prompt (default 16)")
    ap.add_argument("--skew", type=number(0.0, high=1.0), default=0.9,
                    help="share of a phase's prompts drawn from its favoured group (default 0.9)")
    ap.add_argument("--interval", type=positive, default=1.0, help="controller loop period and window length, s (default 1)")
    ap.add_argument("--rebalance-period", type=positive, default=3.0, help="periodic rebalance trigger, s (default 3)")
    ap.add_argument("--min-gain", type=number(0.0, high=0.99), default=0.01,
                    help="skip a rebalance whose predicted balancedness gain is below this (default 0.01)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu",
                    help="where the workers compute the experts (default cpu: bit-equal to the reference on CPU)")
    ap.add_argument("--address", default=None, help="join this Ray cluster instead of starting one")
    ap.add_argument("--seed", type=nonneg_int, default=0, help="random seed of the prompt mix (default 0)")
    ap.add_argument("--json", action="store_true", help="end with one line of JSON")
    ap.set_defaults(keep=False)  # the shared cluster start-up reads it; this demo always tears its cluster down
    a = ap.parse_args(argv)
    if a.workers % a.nodes:
        ap.error(f"--workers={a.workers} is not divisible by --nodes={a.nodes}")
    if not (Path(a.model) / "config.json").is_file():
        ap.error(f"--model={a.model!r}: no config.json there (ray-eplb tiny-model DIR writes a tiny model)")
    if a.device == "cuda" and not a.address and not torch.cuda.is_available():
        ap.error("--device cuda, but torch sees no GPU on this machine")
    try:
        import transformers  # noqa: F401
    except ImportError:
        ap.error("--model needs transformers: pip install 'ray-eplb[hf]'")
    return a


class CountingDispatcher:
    """Forwards to a router and counts the routed (token, expert) pairs per layer: ``counts [L, E]``."""

    def __init__(self, router, num_layers: int, num_experts: int):
        self.router = router
        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.float64)  # [L, E]

    def dispatch(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        """``x [N, H]``, ``topk_ids [N, K]``, ``topk_w [N, K]`` -> ``[N, H]`` (the router's answer)."""
        self.counts[layer] += torch.bincount(topk_ids.reshape(-1), minlength=self.counts.shape[1]).double()
        return self.router.dispatch(layer, x, topk_ids, topk_w)


class Prompts:
    """Batches of token ids ``[B, T]`` (and attention masks) drawn by phase from :data:`PROMPT_GROUPS`:
    the folder's tokenizer (left padding; pad = eos when it has no pad token), else byte-level ids."""

    def __init__(self, folder: str, vocab_size: int, length: int, seed: int):
        self.rng = random.Random(seed)
        self.vocab_size, self.length = vocab_size, length
        self.tokenizer = None
        if any((Path(folder) / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
            if self.tokenizer.pad_token is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
            if self.tokenizer.pad_token is None:  # nothing to pad a batch with: byte-level ids instead
                self.tokenizer = None

    def batch(self, phase: int, size: int, skew: float) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """Phase ``phase``'s batch: (texts, ids ``[B, T]``, attention mask ``[B, T]``)."""
        groups = list(PROMPT_GROUPS.values())
        favoured, every = groups[phase % len(groups)], [p for g in groups for p in g]
        texts = [self.rng.choice(favoured if self.rng.random() < skew else every) for _ in range(size)]
        if self.tokenizer is not None:
            enc = self.tokenizer(texts, return_tensors="pt", padding=True)
            return texts, enc["input_ids"], enc["attention_mask"]
        from ray_eplb.actors.hf_tiny import encode

        ids = torch.tensor([encode(t, self.vocab_size, self.length) for t in texts], dtype=torch.int64)
        return texts, ids, torch.ones_like(ids)


def generate(model, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, pad: int) -> torch.Tensor:
    """Greedy ``[B, new_tokens]`` continuation of ``ids [B, T]`` (exactly ``new_tokens``: no early stop)."""
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=pad)
    return out[:, ids.shape[1]:]


def main(argv: list[str] | None = None) -> int:
    a = parse(list(sys.argv[1:] if argv is None else argv))
    from ray_eplb.actors import HFCheckpointSource
    from ray_eplb.controller.cli.cluster import start_cluster

    t_start = time.monotonic()
    try:
        source = HFCheckpointSource(a.model)
    except (ValueError, OSError, KeyError) as exc:
        print(f"ray-eplb demo: error: --model={a.model!r}: {exc}", file=sys.stderr)
        return 2
    spec = source.spec
    if a.slots_per_gpu and a.slots_per_gpu * a.workers < spec.num_experts:
        print(f"ray-eplb demo: error: --slots-per-gpu={a.slots_per_gpu} x --workers={a.workers} slots cannot hold "
              f"the model's {spec.num_experts} experts", file=sys.stderr)
        return 2
    print(f"[demo] model {a.model}: {spec.model_type}, MoE layers {list(spec.moe_layers)} of {spec.num_hidden_layers}, "
          f"{spec.num_experts} experts, top-{spec.top_k} ({source.naming} naming)")
    cluster, gpu_fraction = start_cluster(a)
    try:
        summary = run(a, source, gpu_fraction, t_start)
        if a.json:
            print(json.dumps(summary))
        return 0 if summary["ok"] else 1
    finally:
        import ray

        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()


def run(a: argparse.Namespace, source, gpu_fraction: float, t_start: float) -> dict:
    """Launch workers and the controller, generate through them phase by phase, tear down; the summary."""
    import ray
    import transformers

    from ray_eplb.actors.hf_attach import attach
    from ray_eplb.actors.ray_worker import launch_workers
    from ray_eplb.actors.router import Router
    from ray_eplb.controller.config import ControllerConfig
    from ray_eplb.controller.ray_controller import start_controller
    from ray_eplb.topology import Placement

    spec = source.spec
    slots = a.slots_per_gpu or math.ceil(spec.num_experts / a.workers) + 1
    topo = spec.topology(num_nodes=a.nodes, gpus_per_node=a.workers // a.nodes, slots_per_gpu=slots)
    ref = transformers.AutoModelForCausalLM.from_pretrained(a.model).eval()
    served = transformers.AutoModelForCausalLM.from_pretrained(a.model).eval()
    p0 = Placement.identity(topo)
    group = launch_workers(topo, p0, source, device=a.device, gpu_fraction=gpu_fraction)
    cfg = ControllerConfig(interval_s=a.interval, collect_timeout_s=min(0.5, a.interval / 2), window=3,
                           trigger="both", rebalance_period_s=max(a.rebalance_period, a.interval), min_gain=a.min_gain)
    ctl = start_controller(topo, cfg, p0)
    router = Router(group.handles, controller=ctl)
    counter = CountingDispatcher(router, topo.num_layers, topo.num_experts)
    attach(served, counter, spec)
    print(f"[demo] {topo.num_gpus} workers ({group.device}), {topo.slots_per_gpu} slots each, and the controller "
          f"ready ({time.monotonic() - t_start:.1f} s); generating")
    try:
        rows, tokens, bad = _generate(a, ref, served, counter, router, ctl, p0)
        ray.get(ctl.stop.remote())
        st = ray.get(ctl.status.remote())
        identity_bad = sum(len(v) for v in ray.get([h.verify.remote() for h in group.handles]))
    finally:
        router.close()
        ray.kill(ctl)
        group.shutdown()
    after = [r for r in rows if r["epoch"] > 0] or rows
    summary = {
        "model": a.model, "model_type": spec.model_type,
        "balancedness_before": round(sum(r["static"] for r in after) / len(after), 4),
        "balancedness_after": round(sum(r["actual"] for r in after) / len(after), 4),
        "windows_after_first_rebalance": sum(r["epoch"] > 0 for r in rows),
        "rebalances": st.rebalances, "experts_moved": st.experts_moved, "bytes_moved": st.bytes_moved,
        "generated_tokens": tokens, "mismatched_tokens": bad, "wrong_weight_slots": identity_bad,
        "ok": bad == 0 and identity_bad == 0,
    }
    for err in st.errors[-5:]:
        print(f"[demo] controller error: {err}")
    print(f"[demo] done in {time.monotonic() - t_start:.1f} s: rebalances {st.rebalances}, moved "
          f"{st.experts_moved} slots ({st.bytes_moved / 2**20:.2f} MiB), {identity_bad} slots with wrong weights")
    print(f"[demo] balancedness over the {len(after)} windows served after the first rebalance: "
          f"{summary['balancedness_before']:.3f} with the start placement -> {summary['balancedness_after']:.3f} measured")
    print(f"[demo] generated tokens {tokens}, mismatched vs the unpatched model {bad}")
    return summary


def _generate(a, ref, served, counter, router, ctl, p0) -> tuple[list[dict], int, int]:
    """Phase by phase, one batch a window: generate with both models, compare, measure balance."""
    import ray

    from ray_eplb.solver import balancedness

    prompts = Prompts(a.model, ref.config.vocab_size, a.prompt_tokens, a.seed)
    pad = ref.config.pad_token_id if ref.config.pad_token_id is not None else 0
    names = list(PROMPT_GROUPS)
    rows, tokens, bad = [], 0, 0
    for phase in range(a.phases):
        for w in range(a.windows_per_phase):
            tw = time.monotonic()
            epoch0 = router.placement.epoch
            counts0, rank0 = counter.counts.clone(), router.rank_tokens.clone()  # [L, E], [L, G]
            texts, ids, mask = prompts.batch(phase, a.batch, a.skew)
            got = generate(served, ids, mask, a.new_tokens, pad)  # [B, N]
            want = generate(ref, ids, mask, a.new_tokens, pad)  # [B, N]
            if w == 0 and prompts.tokenizer is not None:
                print(f"[demo] e.g. {texts[0]!r} -> {prompts.tokenizer.decode(got[0])!r}")
            tokens += want.numel()
            bad += int((got != want).sum())
            rest = a.interval - (time.monotonic() - tw)
            if rest > 0:
                time.sleep(rest)
            per_rank = (router.rank_tokens - rank0).double()  # [L, G] what each rank served this window
            actual = float(per_rank.mean(1).sum() / per_rank.max(1).values.sum().clamp(min=1))
            static = balancedness(p0.phy2log, p0.logcnt, counter.counts - counts0, p0.topology.num_gpus)
            st = ray.get(ctl.status.remote())
            rows.append({"phase": phase, "epoch": epoch0, "actual": actual, "static": static})
            print(f"[demo] phase {phase} ({names[phase % len(names)]}) window {w}  epoch {epoch0:2d}->"
                  f"{router.placement.epoch:2d}  balancedness {actual:.3f} (start placement {static:.3f})  "
                  f"rebalances {st.rebalances}  moved {st.experts_moved}  mismatched {bad}")
    return rows, tokens, bad
