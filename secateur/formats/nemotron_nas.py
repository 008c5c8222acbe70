"""Write a Llama-shaped model in the DeciLM / Nemotron-NAS layout that vLLM's `nemotron_nas`
model reads: `model_type: nemotron-nas`, one `block_configs` entry per layer, Llama weight names.

The folder also carries `configuration_decilm.py` / `modeling_decilm.py` (`auto_map`), so
transformers loads it with `trust_remote_code=True` too. The layout has less freedom than
secateur's own class, and the export refuses (one line,
nothing written) what it cannot say exactly:
- one query-head count for every attention layer (`num_attention_heads`); a layer's KV heads
  are `num_attention_heads // n_heads_in_group`, so they must divide it;
- a layer's MLP width is `ffn_mult_to_intermediate_size(ffn_mult, hidden)`, a multiple of 256:
  other widths have no ffn_mult.

vLLM's DeciLM layer starts the residual stream in the first attention it runs: an MLP before
any attention unpacks a single tensor as (hidden, residual) and fails. So when the first
non-empty layer has no attention, it gets a one-KV-head attention whose weights are all zero
(it adds exactly nothing; the same stand-in llama.cpp needs, see `gguf.py`).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from secateur.errors import SecateurError
from secateur.formats.llama_layout import LayerShape, LlamaLayout
from secateur.formats.remote.configuration_decilm import ffn_mult_to_intermediate_size
from secateur.io import atomic_dir

REMOTE = Path(__file__).parent / "remote"
REMOTE_FILES = ("configuration_decilm.py", "modeling_decilm.py")
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
MAX_SHARD = "5GB"


def ffn_mult_for(size: int, hidden: int) -> float | None:
    """An ffn_mult (6 decimals, as DeciLM's config rounds it) giving exactly `size`, or None."""
    # 3*size/(2*hidden) is the natural value (smollm2: 1536 -> 4.0); it can fall just below the
    # multiple after float rounding, so the middle of the 256-wide bucket is the fallback.
    for target in (size, size - 128):
        mult = round(3 * target / (2 * hidden), 6)
        if mult > 0 and ffn_mult_to_intermediate_size(mult, hidden) == size:
            return mult
    return None


def with_vllm_stand_in(layout: LlamaLayout) -> LlamaLayout:
    """The layout with a zero attention in the first non-empty layer if it has none."""
    first = next(i for i, s in enumerate(layout.layers) if s.has_attention or s.has_mlp)
    shape = layout.layers[first]
    if shape.has_attention:
        return layout
    heads = next(s.num_heads for s in layout.layers if s.has_attention)
    h, d, p = layout.hidden_size, layout.head_dim, f"model.layers.{first}."
    tensors = dict(layout.tensors)
    tensors.update({p + "input_layernorm.weight": torch.ones(h),
                    p + "self_attn.q_proj.weight": torch.zeros(heads * d, h),
                    p + "self_attn.k_proj.weight": torch.zeros(d, h),
                    p + "self_attn.v_proj.weight": torch.zeros(d, h),
                    p + "self_attn.o_proj.weight": torch.zeros(h, heads * d)})
    layers = list(layout.layers)
    layers[first] = LayerShape(heads, 1, shape.intermediate_size)
    return dataclasses.replace(layout, layers=layers, tensors=tensors)


def block_configs(layout: LlamaLayout) -> tuple[int, list[dict[str, Any]]]:
    """(num_attention_heads, block_configs) for the layout; SecateurError if inexpressible."""
    heads = sorted({s.num_heads for s in layout.layers if s.has_attention})
    if len(heads) > 1:
        raise SecateurError(
            f"DeciLM has one query-head count for all layers, this model has {heads}: export "
            "--format gguf (llama.cpp's deci architecture takes per-layer heads)")
    n_heads = heads[0]
    blocks = []
    for i, s in enumerate(layout.layers):
        if s.has_attention:
            if n_heads % s.num_kv_heads:
                raise SecateurError(f"layer {i}: {n_heads} query heads do not split evenly over "
                                    f"{s.num_kv_heads} KV heads (DeciLM's n_heads_in_group)")
            attention = {"no_op": False, "replace_with_linear": False,
                         "n_heads_in_group": n_heads // s.num_kv_heads}
        else:
            attention = {"no_op": True, "replace_with_linear": False, "n_heads_in_group": None}
        if s.has_mlp:
            mult = ffn_mult_for(s.intermediate_size, layout.hidden_size)
            if mult is None:
                raise SecateurError(
                    f"layer {i}: MLP width {s.intermediate_size} has no DeciLM ffn_mult (its "
                    "widths are multiples of 256): export --format gguf, which takes any width")
            ffn = {"no_op": False, "replace_with_linear": False, "ffn_mult": mult}
        else:
            ffn = {"no_op": True, "replace_with_linear": False, "ffn_mult": None}
        blocks.append({"attention": attention, "ffn": ffn})
    return n_heads, blocks


def _rope_fields(rope: dict[str, Any]) -> dict[str, Any]:
    # Both spellings: transformers >= 5 reads rope_parameters, vLLM and older code
    # rope_theta / rope_scaling.
    scaling = None if rope["rope_type"] == "default" else {
        k: v for k, v in rope.items() if k != "rope_theta"}
    return {"rope_theta": rope.get("rope_theta", 10000.0), "rope_scaling": scaling,
            "rope_parameters": dict(rope)}


def decilm_config(layout: LlamaLayout, dtype: str) -> dict[str, Any]:
    n_heads, blocks = block_configs(layout)
    return {
        "architectures": ["DeciLMForCausalLM"],
        "model_type": "nemotron-nas",
        "auto_map": {"AutoConfig": "configuration_decilm.DeciLMConfig",
                     "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM"},
        "block_configs": blocks,
        "hidden_size": layout.hidden_size,
        "num_hidden_layers": len(layout.layers),
        "num_attention_heads": n_heads,
        "head_dim": layout.head_dim,
        "num_key_value_heads": None,
        "intermediate_size": None,
        "hidden_act": "silu",
        "rms_norm_eps": layout.rms_norm_eps,
        "vocab_size": layout.vocab_size,
        "max_position_embeddings": layout.max_position_embeddings,
        **_rope_fields(layout.rope),
        "tie_word_embeddings": layout.tie_word_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        **layout.special_ids,
        "torch_dtype": str(DTYPES[dtype]).removeprefix("torch."),
    }


def _save_weights(tensors: dict[str, torch.Tensor], folder: Path) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(tensors, max_shard_size=MAX_SHARD)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: tensors[n] for n in names}, folder / filename, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size()
                                                for t in tensors.values())},
                 "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_nemotron_nas(layout: LlamaLayout, tokenizer: Any, out: Path, overwrite: bool = False,
                       dtype: str = "f32", inputs: tuple[str, ...] = ()) -> Path:
    """config.json, safetensors weights, the tokenizer, and the config/model code that lets
    transformers load the folder with trust_remote_code (vLLM needs the config class)."""
    if dtype not in DTYPES:
        raise SecateurError(f"nemotron-nas weights are {', '.join(DTYPES)}, got '{dtype}'")
    layout = with_vllm_stand_in(layout)
    config = decilm_config(layout, dtype)  # refuses inexpressible shapes before writing
    tensors = {k: v.to(DTYPES[dtype]).contiguous().clone() for k, v in layout.tensors.items()}
    with atomic_dir(out, overwrite, inputs) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name in REMOTE_FILES:  # transformers loads it with trust_remote_code
            shutil.copyfile(REMOTE / name, tmp / name)
        _save_weights(tensors, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out)
