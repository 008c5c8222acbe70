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
    # c_attn's output is split into q, k, v by split_size (one block per kind)
    width_attributes = {"attn.num_heads": "heads", "attn.split_size": "q_width"}

    def qkv_rows(self, layer: nn.Module, head: int, kind: str) -> tuple[Projection, torch.Tensor]:
        hd = self.attention_shape().head_dim
        fused = self.attention_inputs(layer)[0]
        width = fused.out_features // 3  # this layer's heads * head_dim, after any surgery
        offset = {"q": 0, "k": 1, "v": 2}[kind] * width + head * hd
        return fused, torch.arange(offset, offset + hd)
