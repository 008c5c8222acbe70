"""Random-weight Llama models with the exact shapes of Llama-3.2-1B and Llama-3.1-8B.

    python bench/make_random_llama.py 8b runs/scale/llama-8b-shape

writes bf16 safetensors (one shard per decoder layer, one for embeddings / final norm /
head, and `model.safetensors.index.json`), `config.json` and a tokenizer, without ever holding
more than one shard in memory (the 8B model is about 16 GB; its largest shard, the untied
head or the embeddings, about 1 GB). Weights are normal with std 0.02 (norms are ones), drawn
from a generator seeded per tensor, so a model is the same however it is sharded.

The tokenizer is smollm2-135m's (49152 tokens, secateur's built-in model, which must be
cached: `secateur.load("smollm2-135m")` once): every id it produces is below the 128256-row
vocabulary, which is what the prune needs. `bos_token_id` / `eos_token_id` in the config are
that tokenizer's, not Llama 3's. The shapes, vocabulary size, tying and rope settings are
Llama 3's. Such a model says nothing about quality, only about memory and time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

# From meta-llama/Llama-3.2-1B and meta-llama/Llama-3.1-8B config.json.
SHAPES: dict[str, dict] = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64,
               vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=131072,
               rms_norm_eps=1e-5, rope_parameters={**LLAMA3_ROPE, "factor": 32.0}),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128,
               vocab_size=128256, tie_word_embeddings=False, max_position_embeddings=131072,
               rms_norm_eps=1e-5, rope_parameters={**LLAMA3_ROPE, "factor": 8.0}),
}
NAMES = {"1b": "Llama-3.2-1B", "8b": "Llama-3.1-8B"}
STD = 0.02
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def config_dict(shape: str) -> dict:
    s = SHAPES[shape]
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
            "hidden_act": "silu", "initializer_range": STD, "pretraining_tp": 1,
            "use_cache": True, "dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
            "pad_token_id": 2, "_shape_of": NAMES[shape], "_random_weights": True, **s}


def layer_shapes(s: dict) -> dict[str, tuple[int, ...]]:
    h, i, d = s["hidden_size"], s["intermediate_size"], s["head_dim"]
    q, kv = s["num_attention_heads"] * d, s["num_key_value_heads"] * d
    return {"input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
            "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
            "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h),
            "mlp.down_proj.weight": (h, i)}


def tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Ones for norms, else N(0, STD^2), from a generator seeded by (seed, name)."""
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(
        int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1)
    out = torch.empty(shape, dtype=torch.bfloat16)
    rows = max(1, (1 << 24) // shape[1])  # fp32 scratch of at most 64 MiB
    for r in range(0, shape[0], rows):
        chunk = torch.randn((min(rows, shape[0] - r), shape[1]), generator=g)
        out[r:r + rows] = chunk.mul_(STD)
    return out


def write(shape: str, out: Path, seed: int = 0, tokenizer_from: Path | None = None) -> Path:
    s = SHAPES[shape]
    out.mkdir(parents=True, exist_ok=True)
    n_layers = s["num_hidden_layers"]
    total_shards = n_layers + 1
    weight_map: dict[str, str] = {}
    total = 0

    def shard(number: int, tensors: dict[str, torch.Tensor]) -> None:
        nonlocal total
        name = f"model-{number:05d}-of-{total_shards:05d}.safetensors"
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        for k, t in tensors.items():
            weight_map[k] = name
            total += t.numel() * t.element_size()

    h, v = s["hidden_size"], s["vocab_size"]
    rest = {"model.embed_tokens.weight": tensor("model.embed_tokens.weight", (v, h), seed),
            "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    if not s["tie_word_embeddings"]:
        rest["lm_head.weight"] = tensor("lm_head.weight", (v, h), seed)
    shard(1, rest)
    del rest
    for i in range(n_layers):
        names = {f"model.layers.{i}.{k}": shp for k, shp in layer_shapes(s).items()}
        shard(i + 2, {k: tensor(k, shp, seed) for k, shp in names.items()})
        print(f"layer {i + 1}/{n_layers}", flush=True)
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config_dict(shape), indent=2) + "\n")
    if tokenizer_from is None:
        from secateur.offline import cache_dir

        tokenizer_from = cache_dir() / "models" / "smollm2-135m"
    for f in TOKENIZER_FILES:
        if not (tokenizer_from / f).is_file():
            raise SystemExit(f"{tokenizer_from / f} is missing: run "
                             "secateur.load('smollm2-135m') once to cache its tokenizer")
        shutil.copyfile(tokenizer_from / f, out / f)
    return out


def parameters(shape: str) -> int:
    s = SHAPES[shape]
    per_layer = sum(torch.Size(x).numel() for x in layer_shapes(s).values())
    head = 0 if s["tie_word_embeddings"] else s["vocab_size"] * s["hidden_size"]
    return (s["num_hidden_layers"] * per_layer + s["vocab_size"] * s["hidden_size"]
            + s["hidden_size"] + head)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer-from", type=Path, default=None,
                    help="folder with tokenizer.json and tokenizer_config.json "
                         "(default: smollm2-135m's cached copy)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    write(args.shape, args.out, args.seed, args.tokenizer_from)
    print(f"{NAMES[args.shape]}-shaped model, {parameters(args.shape) / 1e9:.2f}B parameters, "
          f"in {args.out}")


if __name__ == "__main__":
    main()
