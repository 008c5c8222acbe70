"""GPT-NeoX / Pythia adapter: one `query_key_value` interleaved per head as [q, k, v]."""

from __future__ import annotations

import torch
from torch import nn

from secateur.models.base import ModelAdapter, Projection, register_adapter


@register_adapter
class GPTNeoXAdapter(ModelAdapter):
    """GPT-NeoX / Pythia: one `query_key_value` interleaved per head as [q, k, v]."""

    model_types = ("gpt_neox",)
    layers_path = "gpt_neox.layers"
    embed_path = "gpt_neox.embed_in"
    final_norm_path = "gpt_neox.final_layer_norm"
    attn_in = ("attention.query_key_value",)
    attn_out = "attention.dense"
    mlp_in = ("mlp.dense_h_to_4h",)
    mlp_out = "mlp.dense_4h_to_h"
    attn_norm = "input_layernorm"
    mlp_norm = "post_attention_layernorm"
    # the attention reshapes its fused output as (-1 heads, 3 * head_size): no width attributes

    def qkv_rows(self, layer: nn.Module, head: int, kind: str) -> tuple[Projection, torch.Tensor]:
        hd = self.attention_shape().head_dim
        offset = head * 3 * hd + {"q": 0, "k": 1, "v": 2}[kind] * hd
        return self.attention_inputs(layer)[0], torch.arange(offset, offset + hd)
