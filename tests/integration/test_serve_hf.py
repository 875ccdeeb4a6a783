"""The Hugging Face Serve example (examples/serve_hf_moe.py) over HTTP: a tiny Qwen3-MoE deployment
whose routed experts run on ray-eplb workers answers POSTed prompts while the controller rebalances
under it; every response equals the unpatched model's greedy continuation, token by token, and
responses routed by the new epoch follow.

Its own namespace and CPU-sliver ranks (beside the test run's runtime, which holds every
``eplb_rank`` slot); Serve is shut down at the end."""
import json
import socket
import threading
import time
import urllib.error

import pytest
from examples_loader import load_example

pytestmark = pytest.mark.timeout(180)
transformers = pytest.importorskip("transformers")
serve = pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install -e '.[serve]')")

NAMESPACE = "ray_eplb_serve_hf_test"
NEW = 10


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_http_generation_matches_the_unpatched_model_during_a_rebalance(ray_session, tmp_path):
    import ray

    from ray_eplb.actors import HFCheckpointSource
    from ray_eplb.actors.hf_tiny import save_tiny_model
    from ray_eplb.actors.ray_worker import launch_workers
    from ray_eplb.controller import start_controller
    from ray_eplb.controller.cli.model_demo import PROMPT_GROUPS
    from ray_eplb.controller.config import ControllerConfig
    from ray_eplb.topology import Placement

    ex = load_example("serve_hf_moe.py")
    folder = str(save_tiny_model(tmp_path / "tiny", "qwen3_moe"))
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    source = HFCheckpointSource(folder)
    topo = source.spec.topology(num_nodes=2, gpus_per_node=2, slots_per_gpu=3)
    group = launch_workers(topo, Placement.identity(topo), source, device="cpu", namespace=NAMESPACE, resource="CPU")
    ctl = None
    port = free_port()
    try:
        cfg = ControllerConfig(interval_s=10.0, collect_timeout_s=5.0, prepare_timeout_s=30.0, commit_timeout_s=10.0,
                               release_timeout_s=10.0, min_gain=0.0)
        ctl = start_controller(topo, cfg, start_loop=False, namespace=NAMESPACE)
        serve.start(proxy_location="HeadOnly", http_options={"port": port}, logging_config={"log_level": "WARNING"})
        app = ex.HFMoEServer.options(num_replicas=1, ray_actor_options={"num_cpus": 0}).bind(folder, NAMESPACE)
        serve.run(app, name="hf_moe_test", route_prefix="/generate")
        url = f"http://127.0.0.1:{port}/generate"
        prompts = PROMPT_GROUPS["numbers"] * 2 + PROMPT_GROUPS["prose"][:1]  # skewed toward one group
        want = {p: ex.greedy(ref, ex.prompt_ids(folder, p, ref.config.vocab_size)[0], NEW) for p in prompts}

        tok = ex.prompt_ids(folder, prompts[0], ref.config.vocab_size)[1]
        assert tok is not None  # tiny-model folders carry a character-level tokenizer

        def ask(prompt):
            out = ex.post(url, {"prompt": prompt, "max_new_tokens": NEW})
            assert out["ids"] == want[prompt], (prompt, out)  # token by token, the unpatched model's
            assert out["text"] == tok.decode(want[prompt])
            return out["epochs"]

        assert [ask(p) for p in prompts] == [[0]] * len(prompts)
        ids = ex.prompt_ids(folder, prompts[0], ref.config.vocab_size)[0]
        assert ex.post(url, {"ids": ids, "max_new_tokens": NEW})["ids"] == want[prompts[0]]

        # Requests in flight over HTTP while the swap stages, commits and releases.
        spans, errors = [], []  # (sent, answered) monotonic seconds of each request

        def client():
            try:
                for _ in range(2):
                    for p in prompts:
                        t0 = time.monotonic()
                        ask(p)
                        spans.append((t0, time.monotonic()))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=client) for _ in range(2)]
        for t in threads:
            t.start()
        r0 = time.monotonic()
        rec = ray.get(ctl.rebalance_now.remote(fresh=True))  # plans on what the workers counted
        r1 = time.monotonic()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        assert len(spans) == 2 * 2 * len(prompts)
        assert any(t0 < r1 and t1 > r0 for t0, t1 in spans)  # answered over HTTP while the rebalance ran
        assert rec["action"] == "committed" and rec["moved"] > 0, rec
        # After the commit the replica's router follows the subscription to the new epoch.
        for _ in range(20):
            if ask(prompts[0]) == [rec["epoch"]]:
                break
        assert ask(prompts[-1]) == [rec["epoch"]]
        with pytest.raises(urllib.error.HTTPError) as refused:
            ex.post(url, {"prompt": "x", "ids": [2, 3]})
        assert refused.value.code == 400 and "exactly one of prompt" in json.loads(refused.value.read())["error"]
        assert ray.get([h.verify.remote() for h in group.handles]) == [[]] * topo.num_gpus
    finally:
        serve.shutdown()
        if ctl is not None:
            ray.kill(ctl, no_restart=True)
        group.shutdown()
