"""A transformers MoE model served by Ray Serve over HTTP, its routed experts on ray-eplb's workers.

Run: ``python examples/serve_hf_moe.py [--model DIR] [--http-port 8000]`` (about a minute on 2
cores; without ``--model`` it writes a tiny random Qwen3-MoE into a temporary folder, as
``ray-eplb tiny-model DIR`` does). What it does:

1. starts a local Ray cluster (4 CPU stand-ins for GPU ranks), the expert workers, which load the
   routed experts from ``DIR``, and the named controller with its loop running;
2. deploys ``HFMoEServer`` with Ray Serve: a replica loads the model from ``DIR``, attaches it to
   ray-eplb (:func:`ray_eplb.actors.hf_attach.attach`: the model's gates, attention and shared
   experts stay in the replica, the routed experts go through a Router to the workers it finds by
   name) and answers ``POST /generate`` ``{"prompt": "...", "max_new_tokens": 16}`` (or ``"ids":
   [...]`` instead of a prompt) with ``{"ids": [...], "text": ..., "epochs": [...]}``: the greedy
   continuation, its text when the folder has a tokenizer, and the placement epochs it was routed by;
3. posts prompts over HTTP, skewed toward one prompt group, while the controller rebalances under
   the deployment; every response is compared token by token with the unpatched model's greedy
   continuation, computed in this process;
4. prints what happened and shuts Serve and Ray down.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import threading
import time
import urllib.request
from typing import Any

import torch
from ray import serve


def prompt_ids(folder: str, prompt: str, vocab_size: int, length: int = 16) -> tuple[list[int], Any]:
    """Token ids of ``prompt`` (the folder's tokenizer, else byte-level ids) and the tokenizer or ``None``."""
    from pathlib import Path

    if any((Path(folder) / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
        tok = _tokenizer(folder)
        return tok(prompt)["input_ids"], tok
    from ray_eplb.actors.hf_tiny import encode

    return encode(prompt, vocab_size, length), None


_TOKENIZERS: dict[str, Any] = {}  # folder -> its tokenizer, loaded once per process


def _tokenizer(folder: str) -> Any:
    if folder not in _TOKENIZERS:
        from transformers import AutoTokenizer

        _TOKENIZERS[folder] = AutoTokenizer.from_pretrained(folder)
    return _TOKENIZERS[folder]


def greedy(model, ids: list[int], max_new_tokens: int) -> list[int]:
    """The greedy continuation of ``ids`` (exactly ``max_new_tokens`` tokens) by ``model``."""
    x = torch.tensor([ids], dtype=torch.int64)  # [1, T]
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    return out[0, x.shape[1]:].tolist()


class _EpochRecorder:
    """A dispatcher in front of a Router that notes the placement epoch each layer was routed by."""

    def __init__(self, router):
        self.router, self.epochs = router, set()

    def dispatch(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        """``x [N, H]``, ``topk_ids [N, K]``, ``topk_w [N, K]`` -> ``[N, H]``."""
        y = self.router.dispatch(layer, x, topk_ids, topk_w)
        self.epochs.add(self.router.placement.epoch)
        return y


@serve.deployment(max_ongoing_requests=8)
class HFMoEServer:
    """A Serve deployment generating with a Hugging Face MoE model whose routed experts run on the
    ray-eplb workers of ``namespace`` (found by name; the controller's map gives the shape).

    Handle method ``generate(prompt=None, ids=None, max_new_tokens=16)`` and HTTP POST (JSON body
    with the same keys) return ``{"ids": [...], "text": str | None, "epochs": [...]}``.
    """

    def __init__(self, model_dir: str, namespace: str = "ray_eplb"):
        import ray
        import transformers

        from ray_eplb.actors import quiet_zero_copy_warnings
        from ray_eplb.actors.hf_attach import attach
        from ray_eplb.actors.hf_checkpoint import MoeSpec
        from ray_eplb.actors.names import CONTROLLER_NAME, WORKER_NAME
        from ray_eplb.actors.router import Router

        quiet_zero_copy_warnings()
        self.model_dir = model_dir
        spec = MoeSpec.from_folder(model_dir)
        controller = ray.get_actor(CONTROLLER_NAME, namespace=namespace)
        topo = ray.get(controller.wait_map.remote(-1, None, 30.0)).topology
        if (topo.num_layers, topo.num_experts) != (spec.num_layers, spec.num_experts):
            raise ValueError(f"the controller balances {topo.num_layers} layers x {topo.num_experts} experts, "
                             f"the model in {model_dir} has {spec.num_layers} x {spec.num_experts}")
        workers = [ray.get_actor(WORKER_NAME.format(rank=r), namespace=namespace) for r in range(topo.num_gpus)]
        self.router = Router(workers, controller=controller)
        self.recorder = _EpochRecorder(self.router)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
        attach(self.model, self.recorder, spec)
        self._lock = threading.Lock()  # one generation at a time: the epochs it reports are its own
        self.served = 0

    def generate(self, prompt: str | None = None, ids: list[int] | None = None, max_new_tokens: int = 16) -> dict:
        if (prompt is None) == (ids is None):
            raise ValueError("give exactly one of prompt (text) and ids (token ids)")
        if not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= 256:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer in [1, 256]")
        tok = None
        if prompt is not None:
            ids, tok = prompt_ids(self.model_dir, str(prompt), self.model.config.vocab_size)
        with self._lock:
            self.recorder.epochs = set()
            out = greedy(self.model, list(ids), max_new_tokens)
            epochs = sorted(self.recorder.epochs)
        self.served += 1
        return {"ids": out, "text": tok.decode(out) if tok is not None else None, "epochs": epochs}

    async def __call__(self, request) -> Any:
        from starlette.responses import JSONResponse

        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            out = await asyncio.to_thread(self.generate, body.get("prompt"), body.get("ids"),
                                          body.get("max_new_tokens", 16))
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return out

    def __del__(self):  # Serve calls it when the replica shuts down: end the router's long poll
        router = getattr(self, "router", None)
        if router is not None:
            router.close()


def post(url: str, body: dict, timeout: float = 60.0) -> dict:
    """POST ``body`` as JSON to ``url``; the JSON answer."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="local Hugging Face MoE folder (default: a tiny Qwen3-MoE written now)")
    ap.add_argument("--http-port", type=int, default=8000, help="Serve's HTTP port (default 8000)")
    ap.add_argument("--requests", type=int, default=40, help="requests to post (default 40)")
    ap.add_argument("--new-tokens", type=int, default=12, help="tokens generated per request (default 12)")
    a = ap.parse_args()

    import ray
    import transformers

    from ray_eplb.actors import HFCheckpointSource
    from ray_eplb.actors.hf_tiny import save_tiny_model
    from ray_eplb.actors.ray_worker import NAMESPACE, RANK_RESOURCE, enable_zero_copy, launch_workers
    from ray_eplb.controller.cli.model_demo import PROMPT_GROUPS
    from ray_eplb.controller.config import ControllerConfig
    from ray_eplb.controller.ray_controller import start_controller
    from ray_eplb.topology import Placement

    t0 = time.monotonic()
    folder = a.model or str(save_tiny_model(tempfile.mkdtemp(prefix="tiny-qwen3-"), "qwen3_moe"))
    source = HFCheckpointSource(folder)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()  # the unpatched model
    enable_zero_copy()
    ray.init(address="local", resources={RANK_RESOURCE: 4}, include_dashboard=False, log_to_driver=False)
    try:
        topo = source.spec.topology(num_nodes=2, gpus_per_node=2, slots_per_gpu=3)
        group = launch_workers(topo, Placement.identity(topo), source, device="cpu")
        cfg = ControllerConfig(interval_s=0.5, collect_timeout_s=0.25, window=4, rebalance_period_s=2.0, min_gain=0.01)
        controller = start_controller(topo, cfg)
        serve.start(proxy_location="HeadOnly", http_options={"port": a.http_port}, logging_config={"log_level": "WARNING"})
        app = HFMoEServer.options(num_replicas=1, ray_actor_options={"num_cpus": 0}).bind(folder, NAMESPACE)
        serve.run(app, name="hf_moe", route_prefix="/generate")
        url = f"http://127.0.0.1:{a.http_port}/generate"
        print(f"[serve_hf_moe] {folder} served at {url} ({time.monotonic() - t0:.1f} s)")
        prompts = PROMPT_GROUPS["code"] * 3 + [p for g in PROMPT_GROUPS.values() for p in g]  # skewed to code
        bad = tokens = 0
        epochs: set[int] = set()
        for i in range(a.requests):
            prompt = prompts[i % len(prompts)]
            out = post(url, {"prompt": prompt, "max_new_tokens": a.new_tokens})
            if i == 0:
                print(f"[serve_hf_moe] POST {{'prompt': {prompt!r}}} -> ids {out['ids']}, text {out['text']!r}")
            want = greedy(ref, prompt_ids(folder, prompt, ref.config.vocab_size)[0], a.new_tokens)
            bad += sum(x != y for x, y in zip(out["ids"], want)) + abs(len(out["ids"]) - len(want))
            tokens += len(want)
            epochs.update(out["epochs"])
        st = ray.get(controller.status.remote())
        print(f"[serve_hf_moe] {a.requests} requests, {tokens} tokens, {bad} differing from the unpatched model; "
              f"routed by epochs {sorted(epochs)}; rebalances {st.rebalances}, moved {st.experts_moved} slots")
        serve.shutdown()
        ray.kill(controller)
        group.shutdown()
    finally:
        ray.shutdown()
        if a.model is None:  # the tiny model written for this run
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
