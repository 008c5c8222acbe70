"""GPT-2 adapter: `Conv1D` weights stored (in, out), q/k/v stacked in one `c_attn`."""

from __future__ import annotations

import torch
from torch import nn

from secateur.models.base import ModelAdapter, Projection, register_adapter


@register_adapter
class GPT2Adapter(ModelAdapter):
    """GPT-2: `Conv1D` weights stored (in, out) and q/k/v stacked in one `c_attn`."""

    model_types = ("gpt2",)
    layers_path = "transformer.h"
    embed_path = "transformer.wte"
    final_norm_path = "transformer.ln_f"
    attn_in = ("attn.c_attn",)
    attn_out = "attn.c_proj"
    mlp_in = ("mlp.c_fc",)
    mlp_out = "mlp.c_proj"
    attn_norm = "ln_1"
    mlp_norm = "ln_2"
    transposed_weights = True
    num_layers_key = "n_layer"

    def qkv_rows(self, layer: nn.Module, head: int, kind: str) -> tuple[Projection, torch.Tensor]:
        shape = self.attention_shape()
        width = shape.num_heads * shape.head_dim
        offset = {"q": 0, "k": 1, "v": 2}[kind] * width + head * shape.head_dim
        return self.attention_inputs(layer)[0], torch.arange(offset, offset + shape.head_dim)
