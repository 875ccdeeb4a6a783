"""Tiny Hugging Face MoE folders (``ray-eplb tiny-model``) and the pieces of ``demo --model`` that
need no cluster: byte-level prompt ids, the phase-skewed prompt mix, the counting dispatcher."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from ray_eplb.actors import HFCheckpointSource  # noqa: E402
from ray_eplb.actors.hf_checkpoint import FAMILIES  # noqa: E402
from ray_eplb.actors.hf_tiny import TINY_VOCAB, encode, save_tiny_model, save_tiny_tokenizer  # noqa: E402
from ray_eplb.controller.cli import tiny_model  # noqa: E402
from ray_eplb.controller.cli.model_demo import PROMPT_GROUPS, CountingDispatcher, Prompts  # noqa: E402


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_saves_a_folder_its_weight_source_reads(tmp_path, family):
    folder = save_tiny_model(tmp_path / family, family, seed=1, tokenizer=False)
    assert not (folder / "tokenizer.json").exists()
    source = HFCheckpointSource(folder)
    spec = source.spec
    assert spec.model_type == family and spec.num_experts == 8 and spec.top_k == 2 and spec.hidden_size == 64
    assert spec.moe_layers == ((0, 1, 2) if family in ("mixtral", "qwen2_moe", "olmoe") else (1, 2))
    w = source.expert(spec.num_layers - 1, 7)
    assert w.shape == (3, spec.ffn_size, spec.hidden_size) and w.dtype == torch.float32
    assert not torch.equal(w, source.expert(spec.num_layers - 1, 6))  # random weights, one tensor per expert


def test_the_seed_and_the_dtype_reach_the_weights(tmp_path):
    a = HFCheckpointSource(save_tiny_model(tmp_path / "a", "olmoe", seed=1)).expert(0, 0)
    b = HFCheckpointSource(save_tiny_model(tmp_path / "b", "olmoe", seed=2)).expert(0, 0)
    c = HFCheckpointSource(save_tiny_model(tmp_path / "c", "olmoe", seed=1, dtype=torch.bfloat16)).expert(0, 0)
    assert not torch.equal(a, b)
    assert c.dtype == torch.bfloat16 and torch.equal(c, a.to(torch.bfloat16))


def test_refusals_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="'gpt2' is not one of"):
        save_tiny_model(tmp_path / "x", "gpt2")
    save_tiny_model(tmp_path / "y", "mixtral")
    with pytest.raises(ValueError, match="already holds a model"):
        save_tiny_model(tmp_path / "y", "mixtral")
    with pytest.raises(ValueError, match="vocab_size=2"):
        encode("hi", 2, 4)
    with pytest.raises(ValueError, match="length=0"):
        encode("hi", 128, 0)


def test_the_command_writes_the_folder_and_says_what(tmp_path, capsys):
    assert tiny_model.main([str(tmp_path / "m"), "--family", "deepseek_v3", "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "deepseek_v3 (bfloat16)" in out and "MoE layers [1, 2]" in out and "character-level tokenizer" in out
    assert (tmp_path / "m" / "tokenizer.json").is_file()
    assert HFCheckpointSource(tmp_path / "m").expert(0, 0).dtype == torch.bfloat16
    with pytest.raises(SystemExit) as exc:
        tiny_model.main([str(tmp_path / "m")])
    assert exc.value.code == 2


def test_byte_ids_stay_in_the_vocabulary_and_have_the_length():
    ids = encode("héllo", TINY_VOCAB, 11)
    assert len(ids) == 11 and all(2 <= i < TINY_VOCAB for i in ids)
    assert ids[:6] == [2 + b % (TINY_VOCAB - 2) for b in "héllo".encode()]  # 6 UTF-8 bytes
    assert ids[6:] == ids[:5]  # then repeated
    assert encode("", TINY_VOCAB, 3) == [2 + ord(" ") % (TINY_VOCAB - 2)] * 3


def test_the_tiny_tokenizer_round_trips_printable_text_and_pads_left(tmp_path):
    from transformers import AutoTokenizer

    folder = save_tiny_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(folder)
    text = "def add(a, b): return a + b  # 100%!"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text) and max(ids) < TINY_VOCAB and tok.decode(ids) == text
    assert tok("é")["input_ids"] == [tok.unk_token_id]
    prompts = Prompts(str(folder), TINY_VOCAB, 12, seed=0)
    texts, ids, mask = prompts.batch(1, 16, 1.0)
    lengths = mask.sum(1)
    assert lengths.tolist() == [len(t) for t in texts] and ids.shape[1] == max(lengths)
    for row, n in zip(ids, lengths.tolist()):  # left padding: pads first, then the prompt
        assert row[: ids.shape[1] - n].eq(tok.pad_token_id).all() and tok.decode(row[ids.shape[1] - n:]) in texts


def test_a_phase_draws_its_share_from_its_favoured_group(tmp_path):
    prompts = Prompts(str(tmp_path), TINY_VOCAB, 12, seed=0)
    for phase, group in enumerate(PROMPT_GROUPS.values()):
        texts, ids, mask = prompts.batch(phase, 400, 0.9)
        share = sum(t in group for t in texts) / len(texts)
        assert 0.88 < share < 0.99  # 0.9 favoured + 0.1 x 4/12 of the rest by chance: about 0.93
        assert ids.shape == mask.shape == (400, 12) and bool(mask.all())
    texts, _, _ = prompts.batch(0, 300, 0.0)
    assert sum(t in PROMPT_GROUPS["code"] for t in texts) / 300 < 0.45  # no skew: about a third


class Echo:
    def dispatch(self, layer, x, ids, w):
        return x * layer


def test_counting_dispatcher_counts_what_it_forwards():
    d = CountingDispatcher(Echo(), num_layers=2, num_experts=4)
    x = torch.ones(3, 5)
    assert torch.equal(d.dispatch(1, x, torch.tensor([[0, 3], [3, 2], [3, 0]]), torch.full((3, 2), 0.5)), x)
    assert d.counts.tolist() == [[0, 0, 0, 0], [2, 0, 1, 3]]
