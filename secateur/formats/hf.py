"""Saving a model without ever leaving a half-written output directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from secateur.formats.ggml_blocks import write_blocks
from secateur.formats.masks import write_masks
from secateur.io import atomic_dir, write_json_atomic
from secateur.models.mask import has_masks
from secateur.quant.ggml_names import ggml_keys
from secateur.quant.state import is_quantized, weights_state_dict


def save_model(model: nn.Module, tokenizer: Any, out: Path, metadata: dict | None = None,
               overwrite: bool = False, own_state: bool = False) -> Path:
    """`save_pretrained` (safetensors) plus the tokenizer and secateur's run record. A dense
    save of a quantized or pruned model holds its (dequantized) weights, not its grids'
    tensors, llama.cpp block buffers nor its pruning masks: their names would be unexpected
    keys to `from_pretrained` (compressed-tensors' own are written by `packed_save`).
    `own_state`: also write the pruning masks and llama.cpp block buffers beside the
    weights, for a checkpoint that secateur reads back (`formats.masks`,
    `formats.ggml_blocks`)."""
    with atomic_dir(out, overwrite) as tmp:
        dropped = is_quantized(model) or has_masks(model) or bool(ggml_keys(model))
        model.save_pretrained(tmp, state_dict=weights_state_dict(model) if dropped else None)
        if own_state:
            write_masks(model, tmp)
            write_blocks(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if metadata is not None:
            write_json_atomic(tmp / "secateur.json", metadata)
    return Path(out)

