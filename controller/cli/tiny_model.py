"""``ray-eplb tiny-model DIR [--family F] [--dtype D] [--seed S]``: write a tiny random-weight
Hugging Face MoE model (``config.json``, ``model.safetensors``, a character-level tokenizer) into ``DIR``, no hub needed, to try
``ray-eplb demo --model DIR`` and the Serve example on (:mod:`ray_eplb.actors.hf_tiny`)."""
from __future__ import annotations

import sys

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: list[str] | None = None) -> int:
    from ray_eplb.actors.hf_checkpoint import FAMILIES
    from ray_eplb.controller.cli.args import Parser, nonneg_int

    ap = Parser(prog="ray-eplb tiny-model", description=__doc__.splitlines()[0])
    ap.add_argument("folder", metavar="DIR", help="where to write the model (created; must not hold a config.json)")
    ap.add_argument("--family", choices=FAMILIES, default="qwen3_moe", help="architecture (default qwen3_moe)")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="weight dtype (default float32)")
    ap.add_argument("--seed", type=nonneg_int, default=0, help="random seed of the weights (default 0)")
    ap.add_argument("--no-tokenizer", action="store_true",
                    help="write no tokenizer (default: a character-level one of printable ASCII)")
    a = ap.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        import transformers  # noqa: F401
    except ImportError:
        ap.error("needs transformers: pip install 'ray-eplb[hf]'")
    from ray_eplb.actors.hf_checkpoint import MoeSpec
    from ray_eplb.actors.hf_tiny import save_tiny_model

    try:
        folder = save_tiny_model(a.folder, a.family, seed=a.seed, dtype=DTYPES[a.dtype], tokenizer=not a.no_tokenizer)
    except (ValueError, OSError) as exc:
        ap.error(str(exc))
    spec = MoeSpec.from_folder(folder)
    print(f"wrote {folder}: {a.family} ({a.dtype}), {spec.num_hidden_layers} decoder layers, MoE layers "
          f"{list(spec.moe_layers)}, {spec.num_experts} experts, top-{spec.top_k}, hidden {spec.hidden_size}, "
          f"{'no tokenizer' if a.no_tokenizer else 'a character-level tokenizer'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
