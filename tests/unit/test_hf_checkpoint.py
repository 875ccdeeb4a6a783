"""Hugging Face model folders as a weight source: the MoE shape from config.json, every expert
naming (per expert, Mixtral's, fused both ways), sharded folders read lazily, dtypes kept.
Folders are written here with safetensors alone (no transformers needed)."""
import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from ray_eplb.actors import ExpertWorker, HFCheckpointSource, MoeSpec, local_fetcher, swiglu
from ray_eplb.topology import Placement

H, FFN, E = 16, 8, 4

MIXTRAL = {"model_type": "mixtral", "num_hidden_layers": 2, "num_local_experts": E, "num_experts_per_tok": 2,
           "hidden_size": H, "intermediate_size": FFN, "hidden_act": "silu"}
QWEN3 = {"model_type": "qwen3_moe", "num_hidden_layers": 4, "num_experts": E, "num_experts_per_tok": 2,
         "hidden_size": H, "moe_intermediate_size": FFN, "intermediate_size": 3 * FFN, "mlp_only_layers": [0],
         "decoder_sparse_step": 1, "dtype": "bfloat16"}
DEEPSEEK_V3 = {"model_type": "deepseek_v3", "num_hidden_layers": 3, "n_routed_experts": E, "num_experts_per_tok": 2,
               "hidden_size": H, "moe_intermediate_size": FFN, "intermediate_size": 3 * FFN, "first_k_dense_replace": 1,
               "n_group": 2, "topk_group": 1, "n_shared_experts": 1}


def experts(num_layers, dtype=torch.float32, seed=0):
    """gate, up ``[L, E, FFN, H]`` and down ``[L, E, H, FFN]`` random weights."""
    g = torch.Generator().manual_seed(seed)
    gate, up = (torch.randn(num_layers, E, FFN, H, generator=g).to(dtype) for _ in range(2))
    return gate, up, torch.randn(num_layers, E, H, FFN, generator=g).to(dtype)


def write(folder, config, layers, naming, dtype=torch.float32, block="mlp", shards=1):
    """A model folder whose decoder layers ``layers`` hold routed experts in ``naming``; returns
    the weights (index = position in ``layers``). ``shards`` > 1: one shard per MoE layer and an index."""
    gate, up, down = experts(len(layers), dtype)
    per_shard = [{} for _ in range(shards)]
    for n, layer in enumerate(layers):
        t = per_shard[n % shards]
        base = f"model.layers.{layer}.{block}.experts"
        t[f"model.layers.{layer}.{block}.gate.weight"] = torch.randn(E, H).to(dtype)
        t[f"model.layers.{layer}.{block}.shared_experts.gate_proj.weight"] = torch.randn(FFN, H).to(dtype)
        if naming == "fused":  # transformers 5's in-memory layout
            t[f"{base}.gate_up_proj"] = torch.cat([gate[n], up[n]], dim=1).contiguous()  # [E, 2I, H]
            t[f"{base}.down_proj"] = down[n].contiguous()  # [E, H, FFN]
        elif naming == "fused_t":  # the layout Llama 4 ships
            t[f"{base}.gate_up_proj"] = torch.cat([gate[n], up[n]], dim=1).transpose(1, 2).contiguous()  # [E, H, 2I]
            t[f"{base}.down_proj"] = down[n].transpose(1, 2).contiguous()  # [E, FFN, H]
        else:
            names = ("w1", "w3", "w2") if naming == "w123" else ("gate_proj", "up_proj", "down_proj")
            for e in range(E):
                for name, w in zip(names, (gate[n, e], up[n, e], down[n, e]), strict=True):
                    t[f"{base}.{e}.{name}.weight"] = w.contiguous()
    per_shard[0]["model.embed_tokens.weight"] = torch.randn(32, H).to(dtype)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if shards == 1:
        save_file(per_shard[0], str(folder / "model.safetensors"))
    else:
        weight_map = {}
        for s, t in enumerate(per_shard):
            name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file(t, str(folder / name))
            weight_map.update({k: name for k in t})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return gate, up, down


def test_spec_reads_dense_layers_sparse_steps_groups_and_shared_experts():
    q = MoeSpec.from_config({**QWEN3, "decoder_sparse_step": 2, "num_experts": None, "num_local_experts": E})
    assert q.moe_layers == (1, 3) and q.num_experts == E and q.dtype == "bfloat16"  # layer 0 dense, then every 2nd
    ds = MoeSpec.from_config({**DEEPSEEK_V3, "num_hidden_layers": 6, "moe_layer_freq": 2})
    assert ds.moe_layers == (2, 4) and (ds.num_groups, ds.topk_groups, ds.shared_experts) == (2, 1, True)
    assert (ds.layer_index(4), ds.moe_layers[1]) == (1, 4)
    with pytest.raises(ValueError, match="decoder layer 3 is not sparse"):
        ds.layer_index(3)
    topo = ds.topology(num_nodes=2, gpus_per_node=1, slots_per_gpu=3)
    assert (topo.num_layers, topo.num_experts, topo.num_groups) == (2, E, 2)
    v2 = {**DEEPSEEK_V3, "model_type": "deepseek_v2"}
    assert MoeSpec.from_config(v2).num_groups == 1  # greedy top-k: the groups do not limit routing
    assert MoeSpec.from_config({**v2, "topk_method": "group_limited_greedy"}).num_groups == 2
    m = MoeSpec.from_config(MIXTRAL)
    assert m.moe_layers == (0, 1) and m.ffn_size == FFN and not m.shared_experts
    qwen2 = {**QWEN3, "model_type": "qwen2_moe", "shared_expert_intermediate_size": 8}
    assert MoeSpec.from_config(qwen2).shared_experts


@pytest.mark.parametrize("change,match", [
    ({"model_type": "llama"}, "model_type='llama'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"num_experts_per_tok": 9}, "top_k=9"),
    ({"num_local_experts": None}, "num_local_experts"),
    ({"num_hidden_layers": 1}, "no decoder layer sparse"),
    ({"n_group": 3, "model_type": "deepseek_v3", "n_routed_experts": E, "moe_intermediate_size": FFN}, "num_groups=3"),
])
def test_spec_rejects_configs_it_cannot_serve(change, match):
    config = {**MIXTRAL, **change}
    if change.get("num_hidden_layers") == 1:
        config = {**QWEN3, **change}
    with pytest.raises(ValueError, match=match):
        MoeSpec.from_config(config)


@pytest.mark.parametrize("naming,block,dtype", [
    ("per_expert", "mlp", torch.float32),
    ("w123", "block_sparse_moe", torch.bfloat16),
    ("fused", "mlp", torch.float32),
    ("fused_t", "mlp", torch.bfloat16),
])
def test_every_naming_reads_the_same_experts_in_their_dtype(tmp_path, naming, block, dtype):
    config = MIXTRAL if block == "block_sparse_moe" else QWEN3
    layers = list(MoeSpec.from_config(config).moe_layers)
    gate, up, down = write(tmp_path, config, layers, naming, dtype, block)
    src = HFCheckpointSource(tmp_path)
    assert src.naming == f"{'per_expert' if naming == 'w123' else naming}:{block}"
    for n in range(len(layers)):
        for e in range(E):
            w = src.expert(n, e)  # [3, FFN, H]
            assert w.dtype == dtype and tuple(w.shape) == (3, FFN, H)
            assert torch.equal(w, torch.stack([gate[n, e], up[n, e], down[n, e].T]))
    assert torch.equal(HFCheckpointSource(tmp_path, dtype=torch.float64).expert(0, 1), src.expert(0, 1).double())
    with pytest.raises(ValueError, match="expert=4"):
        src.expert(0, E)
    with pytest.raises(ValueError, match="layer=3"):
        src.expert(3, 0)


def test_sharded_folder_opens_only_the_shards_of_requested_experts(tmp_path):
    layers = [1, 2]
    gate, up, down = write(tmp_path, DEEPSEEK_V3, layers, "per_expert", shards=2)
    src = HFCheckpointSource(tmp_path)
    assert src._handles == {}  # the index alone, no shard opened yet
    assert torch.equal(src.expert(1, 2), torch.stack([gate[1, 2], up[1, 2], down[1, 2].T]))
    assert [f.rsplit("/", 1)[1] for f in src._handles] == ["model-00002-of-00002.safetensors"]
    clone = pickle.loads(pickle.dumps(src))  # ships as its path: a worker opens the files itself
    assert clone._handles == {} and torch.equal(clone.expert(0, 3), src.expert(0, 3))


def test_fused_sharded_folder_reads_one_expert_slice(tmp_path):
    layers = [1, 2]
    gate, up, down = write(tmp_path, DEEPSEEK_V3, layers, "fused_t", shards=2)
    src = HFCheckpointSource(tmp_path)
    assert src.naming == "fused_t:mlp"
    assert torch.equal(src.expert(1, 3), torch.stack([gate[1, 3], up[1, 3], down[1, 3].T]))


def test_broken_folders_are_refused_with_the_missing_piece_named(tmp_path):
    write(tmp_path / "a", QWEN3, [1, 2], "per_expert")  # layer 3 is sparse in the config but has no experts
    with pytest.raises(ValueError, match="MoE layer 3 lacks 'model.layers.3.mlp.experts.3.gate_proj.weight'"):
        HFCheckpointSource(tmp_path / "a")
    write(tmp_path / "b", {**QWEN3, "moe_intermediate_size": 2 * FFN}, [1, 2, 3], "fused")
    with pytest.raises(ValueError, match="fit neither"):
        HFCheckpointSource(tmp_path / "b")
    write(tmp_path / "c", QWEN3, [1, 2, 3], "per_expert", block="moe")
    with pytest.raises(ValueError, match="no routed experts of decoder layer 1"):
        HFCheckpointSource(tmp_path / "c")
    with pytest.raises(ValueError, match="no config.json"):
        HFCheckpointSource(tmp_path / "missing")


def test_workers_serve_a_bf16_folder_and_swap_it_as_bf16(tmp_path):
    write(tmp_path, QWEN3, [1, 2, 3], "per_expert", dtype=torch.bfloat16)
    src = HFCheckpointSource(tmp_path)
    topo = src.spec.topology(num_nodes=1, gpus_per_node=2, slots_per_gpu=3)
    p = Placement.identity(topo)
    workers = {}
    fetch = local_fetcher(lambda r: workers[r])
    for r in range(2):
        workers[r] = ExpertWorker(r, topo, p.rank_experts(r), src, fetcher=fetch, device="cpu")
    assert workers[0].state()["expert_bytes"] == 3 * FFN * H * 2
    x = torch.randn(3, H)
    y = workers[1].forward(0, 2, torch.tensor([0, 1, 2]), x)  # slots 3, 4, 5 hold experts 3, 0, 1
    assert y.dtype == torch.float32
    for i, e in enumerate([3, 0, 1]):
        assert torch.equal(y[i], swiglu(x[i : i + 1].bfloat16(), src.expert(2, e))[0].float())
    assert all(w.verify() == [] for w in workers.values())
