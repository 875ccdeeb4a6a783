"""Tiny random-weight Hugging Face MoE models, written with ``save_pretrained``: a local folder to
try ``ray-eplb demo --model DIR`` and the Serve example on, with no hub and no download.

Every family of :data:`~ray_eplb.actors.hf_checkpoint.FAMILIES` builds from its transformers
config class: 8 routed experts, top-2, hidden 64, expert FFN 32, 3 decoder layers, a 128-token
vocabulary (families with dense first layers keep decoder layer 0 dense; DeepSeek has 2 expert
groups and a shared expert, Qwen2-MoE a gated shared expert). The folder holds ``config.json``
and ``model.safetensors`` with per-expert keys, and a character-level tokenizer of printable ASCII
(:func:`save_tiny_tokenizer`: ``<pad>`` 0, ``<s>`` 1, ``<unk>`` 2, then one id per character), so
prompts go in and text comes out. Folders without a tokenizer get byte-level ids (:func:`encode`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ray_eplb.actors.hf_checkpoint import FAMILIES

TINY_VOCAB = 128
_COMMON = dict(vocab_size=TINY_VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=256, initializer_range=0.2, tie_word_embeddings=False,
               pad_token_id=0, bos_token_id=1, eos_token_id=None)
_DEEPSEEK = dict(moe_intermediate_size=32, intermediate_size=96, n_routed_experts=8, n_shared_experts=1,
                 first_k_dense_replace=1, n_group=2, topk_group=1, kv_lora_rank=16, qk_rope_head_dim=8,
                 qk_nope_head_dim=8, v_head_dim=16)


def tiny_config(family: str) -> Any:
    """The transformers config of a tiny ``family`` model (one of :data:`FAMILIES`)."""
    import transformers as t

    if family == "mixtral":
        return t.MixtralConfig(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, **_COMMON)
    if family == "qwen3_moe":
        return t.Qwen3MoeConfig(moe_intermediate_size=32, intermediate_size=96, num_experts=8, num_experts_per_tok=2,
                                mlp_only_layers=[0], norm_topk_prob=True, head_dim=16, **_COMMON)
    if family == "qwen2_moe":
        return t.Qwen2MoeConfig(moe_intermediate_size=32, intermediate_size=96, shared_expert_intermediate_size=48,
                                num_experts=8, num_experts_per_tok=2, **_COMMON)
    if family == "olmoe":
        return t.OlmoeConfig(intermediate_size=32, num_experts=8, num_experts_per_tok=2, **_COMMON)
    if family == "deepseek_v3":
        return t.DeepseekV3Config(q_lora_rank=24, num_experts_per_tok=2, routed_scaling_factor=2.5,
                                  **_DEEPSEEK, **_COMMON)
    if family == "deepseek_v2":
        return t.DeepseekV2Config(q_lora_rank=None, num_experts_per_tok=2, topk_method="group_limited_greedy",
                                  **_DEEPSEEK, **_COMMON)
    raise ValueError(f"family={family!r} is not one of {FAMILIES}")


def save_tiny_tokenizer(folder: str | os.PathLike) -> Path:
    """Write a character-level tokenizer of the printable ASCII characters into ``folder`` (98 ids,
    within the tiny vocabulary; any other character is ``<unk>``). Returns the folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)]
    vocab = {"<pad>": 0, "<s>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # every character a token
    tok.decoder = decoders.Fuse()  # and back without separators
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", unk_token="<unk>")
    fast.save_pretrained(folder)
    return Path(folder)


def save_tiny_model(folder: str | os.PathLike, family: str = "qwen3_moe", *, seed: int = 0,
                    dtype: torch.dtype = torch.float32, tokenizer: bool = True) -> Path:
    """Build a tiny random ``family`` model (weights from ``seed``) and ``save_pretrained`` it into
    ``folder`` (created if absent; an existing ``config.json`` there is refused), with
    :func:`save_tiny_tokenizer`'s tokenizer unless ``tokenizer=False``. Returns the folder."""
    import transformers

    folder = Path(folder)
    if (folder / "config.json").exists():
        raise ValueError(f"{folder} already holds a model (config.json): choose an empty folder")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype={dtype} must be float32, bfloat16 or float16")
    config = tiny_config(family)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    if tokenizer:
        save_tiny_tokenizer(folder)
    return folder


def encode(text: str, vocab_size: int, length: int) -> list[int]:
    """Token ids for a model folder without a tokenizer: the text's UTF-8 bytes mapped into
    ``[2, vocab_size)`` (ids 0 and 1 are the tiny models' pad and bos), repeated or cut to ``length``."""
    if vocab_size <= 2:
        raise ValueError(f"vocab_size={vocab_size} leaves no ids beside pad and bos")
    if length <= 0:
        raise ValueError(f"length={length} must be positive")
    raw = text.encode() or b" "
    ids = [2 + b % (vocab_size - 2) for b in raw]
    return (ids * (length // len(ids) + 1))[:length]
