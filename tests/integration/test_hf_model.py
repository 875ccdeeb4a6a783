"""A real transformers architecture (a tiny Qwen3-MoE) served by Ray worker actors that load its
experts from the saved folder, rebalanced by the controller on the load the workers counted: the
generated tokens are the unpatched model's before and after.

Its own namespace and CPU-sliver ranks, so it runs beside the other tests' runtime (which holds every
``eplb_rank`` slot)."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

NAMESPACE = "ray_eplb_hf_test"


def test_qwen3_moe_on_ray_workers_generates_the_unpatched_tokens_across_a_rebalance(ray_session, tmp_path):
    import ray

    from ray_eplb.actors import HFCheckpointSource
    from ray_eplb.actors.hf_attach import attach
    from ray_eplb.actors.ray_worker import launch_workers
    from ray_eplb.actors.router import Router
    from ray_eplb.controller import start_controller
    from ray_eplb.controller.config import ControllerConfig
    from ray_eplb.topology import Placement

    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, moe_intermediate_size=32, intermediate_size=96, num_experts=8, num_experts_per_tok=2,
        mlp_only_layers=[0], norm_topk_prob=True, initializer_range=0.2, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=None,
    )
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    source = HFCheckpointSource(tmp_path)
    topo = source.spec.topology(num_nodes=2, gpus_per_node=2, slots_per_gpu=3)
    ids = torch.randint(2, 128, (2, 8), generator=torch.Generator().manual_seed(1))

    def generate(model):
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=0)
            return out, model(out).logits

    want, ref_logits = generate(ref)
    group = launch_workers(topo, Placement.identity(topo), source, device="cpu", namespace=NAMESPACE, resource="CPU")
    ctl = router = None
    try:
        config = ControllerConfig(interval_s=10.0, collect_timeout_s=5.0, prepare_timeout_s=30.0,
                                  commit_timeout_s=10.0, release_timeout_s=10.0, min_gain=0.0)
        ctl = start_controller(topo, config, start_loop=False, namespace=NAMESPACE)
        router = Router(group.handles, controller=ctl)
        served = copy.deepcopy(ref)
        assert attach(served, router) == [1, 2]

        got, got_logits = generate(served)
        assert torch.equal(got, want)
        assert (got_logits - ref_logits).abs().max().item() <= 1e-4

        rec = ray.get(ctl.rebalance_now.remote(fresh=True))  # plans on what the workers counted
        assert rec["action"] == "committed", rec
        assert rec["moved"] >= 0.25 * topo.num_layers * topo.num_slots, rec
        assert rec["bytes_moved"] > 0
        got, got_logits = generate(served)
        assert router.placement.epoch == rec["epoch"] > 0  # the router adopted the new map
        assert torch.equal(got, want)
        assert (got_logits - ref_logits).abs().max().item() <= 1e-4
        assert ray.get([h.verify.remote() for h in group.handles]) == [[]] * topo.num_gpus
    finally:
        if router is not None:
            router.close()
        if ctl is not None:
            ray.kill(ctl, no_restart=True)
        group.shutdown()
