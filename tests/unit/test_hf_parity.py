"""Real transformers architectures served through ray-eplb, in one process: each family's tiny
random model, saved with save_pretrained, generates exactly the unpatched model's tokens with its
routed experts on the workers (loaded from the same folder), before and after a rebalance that
moves at least a quarter of the slots; float32 logits agree within 1e-4, a bf16 model to the bit."""
import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from ray_eplb.actors import ExpertWorker, HFCheckpointSource, local_fetcher  # noqa: E402
from ray_eplb.actors.hf_attach import attach, attached_layers  # noqa: E402
from ray_eplb.actors.router import LocalRouter  # noqa: E402
from ray_eplb.actors.worker import decode_counts  # noqa: E402
from ray_eplb.controller.transfer import split_by_rank, transfer_plan  # noqa: E402
from ray_eplb.topology import Placement, plan  # noqa: E402

VOCAB, NEW_TOKENS = 128, 32
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, initializer_range=0.2, tie_word_embeddings=False,
              pad_token_id=0, bos_token_id=1, eos_token_id=None)
DEEPSEEK = dict(moe_intermediate_size=32, intermediate_size=96, n_routed_experts=8, n_shared_experts=1,
                first_k_dense_replace=1, n_group=2, topk_group=1, kv_lora_rank=16, qk_rope_head_dim=8,
                qk_nope_head_dim=8, v_head_dim=16)


def config(family):
    """A tiny random config: 8 routed experts, top-2, hidden 64, 3 decoder layers."""
    t = transformers
    if family == "mixtral":
        return t.MixtralConfig(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, **COMMON)
    if family == "qwen3_moe":  # decoder layer 0 dense
        return t.Qwen3MoeConfig(moe_intermediate_size=32, intermediate_size=96, num_experts=8, num_experts_per_tok=2,
                                mlp_only_layers=[0], norm_topk_prob=True, head_dim=16, **COMMON)
    if family == "qwen2_moe":  # a gated shared expert in every block
        return t.Qwen2MoeConfig(moe_intermediate_size=32, intermediate_size=96, shared_expert_intermediate_size=48,
                                num_experts=8, num_experts_per_tok=2, **COMMON)
    if family == "olmoe":
        return t.OlmoeConfig(intermediate_size=32, num_experts=8, num_experts_per_tok=2, **COMMON)
    if family == "deepseek_v3":  # dense layer 0, 2 expert groups, a shared expert, scaled weights
        return t.DeepseekV3Config(q_lora_rank=24, num_experts_per_tok=2, routed_scaling_factor=2.5,
                                  **DEEPSEEK, **COMMON)
    if family == "deepseek_v2":
        return t.DeepseekV2Config(q_lora_rank=None, num_experts_per_tok=2, topk_method="group_limited_greedy",
                                  **DEEPSEEK, **COMMON)
    raise ValueError(family)


def save_model(family, folder, dtype=torch.float32):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config(family)).to(dtype)
    model.save_pretrained(folder)
    return folder


def load(folder, dtype=torch.float32):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


class Served:
    """An attached copy of ``ref`` over 4 in-process workers (2 nodes x 2 ranks x 3 slots)."""

    def __init__(self, ref, source):
        self.source = source
        self.topo = source.spec.topology(num_nodes=2, gpus_per_node=2, slots_per_gpu=3)
        self.placement = Placement.identity(self.topo)
        self.workers = {}
        fetch = local_fetcher(lambda r: self.workers[r])
        for r in range(self.topo.num_gpus):
            self.workers[r] = ExpertWorker(r, self.topo, self.placement.rank_experts(r), source, fetcher=fetch,
                                           device="cpu")
        self.router = LocalRouter([self.workers[r] for r in range(self.topo.num_gpus)], self.placement)
        self.model = copy.deepcopy(ref)
        assert attach(self.model, self.router) == list(source.spec.moe_layers)
        assert attached_layers(self.model) == list(source.spec.moe_layers)
        # The model kept no routed expert weights of its own.
        assert not any(".experts." in name for name, _ in self.model.named_parameters())

    def load(self):
        """``[L, E]`` tokens per logical expert so far, from the workers' counters of the active epoch."""
        counts = torch.cat([decode_counts(self.workers[r].collect())[-1] for r in range(self.topo.num_gpus)], 1)
        load = torch.zeros(self.topo.num_layers, self.topo.num_experts, dtype=torch.int64)
        return load.scatter_add_(1, self.placement.phy2log, counts)  # counts [L, R] by slot -> by expert

    def rebalance(self):
        """Plan on the served load and apply it with the workers' two-phase swap; returns the moved fraction."""
        old = self.placement
        new = plan(self.topo, self.load().double(), epoch=old.epoch + 1)
        per_rank = split_by_rank(transfer_plan(old, new), self.topo.num_gpus)
        for r, w in self.workers.items():
            assert w.prepare(new.epoch, per_rank[r], new.rank_experts(r))["status"] == "prepared"
        for w in self.workers.values():
            assert w.commit(new.epoch)["status"] == "committed"
        self.router.adopt(new)
        for w in self.workers.values():
            w.release(old.epoch)
            assert w.verify() == []
        self.placement = new
        return float(old.changed_slots(new).double().mean())


def prompts():
    return torch.randint(2, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))


def generate(model, ids):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()  # [B, T, V]


def check_parity(ref, served, ids, want, ref_logits, atol):
    got = generate(served.model, ids)
    assert torch.equal(got, want)
    diff = (logits(served.model, want) - ref_logits).abs().max().item()
    assert diff <= atol, diff


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "olmoe", "deepseek_v3", "qwen2_moe", "deepseek_v2"])
def test_served_model_generates_the_unpatched_tokens_across_a_rebalance(tmp_path, family):
    folder = save_model(family, tmp_path / family)
    source = HFCheckpointSource(folder)
    # transformers 5 writes experts one by one (Mixtral's in its block_sparse_moe naming).
    assert source.naming == ("per_expert:block_sparse_moe" if family == "mixtral" else "per_expert:mlp")
    ref = load(folder)
    ids = prompts()
    want = generate(ref, ids)
    assert len(set(want[:, ids.shape[1]:].reshape(-1).tolist())) >= 4  # varied text, not one repeated token
    ref_logits = logits(ref, want)
    served = Served(ref, source)

    before = served.load().sum(1)  # [L]
    check_parity(ref, served, ids, want, ref_logits, atol=1e-4)
    # The workers counted every routed token: K = 2 per token per MoE layer.
    counted = served.load().sum(1) - before  # [L]
    tokens = ids.numel() + ids.shape[0] * (NEW_TOKENS - 1) + want.numel()  # prompt, decode steps, the logits pass
    assert counted.tolist() == [2 * tokens] * served.topo.num_layers

    moved = served.rebalance()
    assert moved >= 0.25, moved
    check_parity(ref, served, ids, want, ref_logits, atol=1e-4)

    # The check can fail: a router whose map the workers do not hold sends tokens to wrong experts.
    p = served.placement
    wrong = Placement.from_phy2log(served.topo, torch.roll(p.phy2log, 1, dims=1), epoch=p.epoch)
    served.router.adopt(wrong)
    assert (logits(served.model, want) - ref_logits).abs().max().item() > 1e-2


def test_fused_checkpoint_serves_the_same_tokens(tmp_path):
    """Experts shipped fused (``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]``, the layout Llama 4
    and GPT-OSS use) in two shards with an index: the workers read one expert's slice at a time."""
    per_expert = save_model("olmoe", tmp_path / "per_expert")
    ref = load(per_expert)
    fused = tmp_path / "fused"
    fused.mkdir()
    (fused / "config.json").write_text((per_expert / "config.json").read_text())
    tensors = load_file(str(per_expert / "model.safetensors"))
    experts = {k: v for k, v in tensors.items() if ".experts." in k}
    shards = [{k: v for k, v in tensors.items() if ".experts." not in k}, {}]
    for n in range(len(ref.model.layers)):
        base = f"model.layers.{n}.mlp.experts"
        gate = torch.stack([experts[f"{base}.{e}.gate_proj.weight"] for e in range(8)])  # [E, I, H]
        up = torch.stack([experts[f"{base}.{e}.up_proj.weight"] for e in range(8)])  # [E, I, H]
        down = torch.stack([experts[f"{base}.{e}.down_proj.weight"] for e in range(8)])  # [E, H, I]
        shard = shards[n % 2]
        shard[f"{base}.gate_up_proj"] = torch.cat([gate, up], 1).transpose(1, 2).contiguous()  # [E, H, 2I]
        shard[f"{base}.down_proj"] = down.transpose(1, 2).contiguous()  # [E, I, H]
    weight_map = {}
    for s, shard in enumerate(shards):
        name = f"model-{s + 1:05d}-of-00002.safetensors"
        save_file(shard, str(fused / name))
        weight_map.update({k: name for k in shard})
    (fused / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    source = HFCheckpointSource(fused)
    assert source.naming == "fused_t:mlp"
    ids = prompts()
    want = generate(ref, ids)
    served = Served(ref, source)
    check_parity(ref, served, ids, want, logits(ref, want), atol=1e-4)


def test_bf16_model_is_served_in_bf16_to_the_bit(tmp_path):
    """Mixtral's gate hands float32 weights to bf16 experts: the mixed-dtype combine path."""
    folder = save_model("mixtral", tmp_path / "bf16", dtype=torch.bfloat16)
    source = HFCheckpointSource(folder)
    assert source.expert(0, 0).dtype == torch.bfloat16  # the checkpoint's dtype, end to end
    ref = load(folder, torch.bfloat16)
    ids = prompts()
    want = generate(ref, ids)
    ref_logits = logits(ref, want)
    served = Served(ref, source)
    assert served.workers[0].state()["expert_bytes"] == 3 * 32 * 64 * 2
    check_parity(ref, served, ids, want, ref_logits, atol=0.0)
    assert served.rebalance() >= 0.25
    check_parity(ref, served, ids, want, ref_logits, atol=0.0)


def test_attach_refuses_a_model_it_does_not_fit():
    from ray_eplb.actors import MoeSpec

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config("qwen3_moe"))
    spec = MoeSpec.from_config(model.config.to_dict())
    with pytest.raises(ValueError, match=r"sparse layers \[1, 2\] are not the spec's MoE layers \[2\]"):
        attach(model, None, spec.model_copy(update={"moe_layers": (2,)}))
    with pytest.raises(ValueError, match=r"gate_up_proj \(8, 64, 64\), expected \(8, 128, 64\)"):
        attach(model, None, spec.model_copy(update={"ffn_size": 64}))
    assert attach(model, None) == [1, 2] and attached_layers(model) == [1, 2]
    with pytest.raises(ValueError, match="decoder layer 1 is attached already"):
        attach(model, None)
