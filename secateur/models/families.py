"""Adapters for the supported families: module paths, plus the few real differences in code."""

from __future__ import annotations

import torch
from torch import nn

from secateur.models.base import (
    AttentionShape,
    ModelAdapter,
    Projection,
    get_submodule,
    register_adapter,
)


@register_adapter
class LlamaAdapter(ModelAdapter):
    """Llama, Mistral, Qwen2/3 and SmolLM: pre-norm, GQA, SwiGLU MLP."""

    model_types = ("llama", "mistral", "qwen2", "qwen3", "smollm3")
    layers_path = "model.layers"
    embed_path = "model.embed_tokens"
    final_norm_path = "model.norm"
    attn_in = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    attn_out = "self_attn.o_proj"
    mlp_in = ("mlp.gate_proj", "mlp.up_proj")
    mlp_out = "mlp.down_proj"
    attn_norm = "input_layernorm"
    mlp_norm = "post_attention_layernorm"
    width_surgery = True

    def set_layer_widths(self, index: int, num_heads: int, num_kv_heads: int) -> None:
        # The forward infers heads from the shapes; only the GQA repeat count is stored.
        attn = self.layers[index].self_attn
        attn.num_key_value_groups = num_heads // num_kv_heads
        for key, value in (("num_heads", num_heads), ("num_key_value_heads", num_kv_heads)):
            if hasattr(attn, key):
                setattr(attn, key, value)


@register_adapter
class SecateurLlamaAdapter(LlamaAdapter):
    """secateur's own Llama with per-layer widths (secateur.surgery.flexmodel)."""

    model_types = ("secateur_llama",)

    def layer_attention_shape(self, index: int) -> AttentionShape:
        cfg = self.config
        return AttentionShape(cfg.layer_num_heads[index], cfg.layer_num_kv_heads[index],
                              cfg.head_dim)

    def set_layer_widths(self, index: int, num_heads: int, num_kv_heads: int) -> None:
        super().set_layer_widths(index, num_heads, num_kv_heads)
        self.config.layer_num_heads[index] = num_heads
        self.config.layer_num_kv_heads[index] = num_kv_heads


@register_adapter
class Gemma3Adapter(LlamaAdapter):
    """Gemma 3: Llama's projections, sandwich norms, and a softcap on the final logits."""

    model_types = ("gemma3_text",)
    mlp_norm = "pre_feedforward_layernorm"

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().logits_from_hidden(hidden)
        cap = getattr(self.config, "final_logit_softcapping", None)
        return logits if cap is None else torch.tanh(logits / cap) * cap


@register_adapter
class OPTAdapter(ModelAdapter):
    model_types = ("opt",)
    layers_path = "model.decoder.layers"
    embed_path = "model.decoder.embed_tokens"
    final_norm_path = "model.decoder.final_layer_norm"
    attn_in = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    attn_out = "self_attn.out_proj"
    mlp_in = ("fc1",)
    mlp_out = "fc2"
    attn_norm = "self_attn_layer_norm"
    mlp_norm = "final_layer_norm"

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = super().final_norm(hidden)
        # OPT-350m projects from the hidden width down to the embedding width after the norm.
        project_out = get_submodule(self.model, "model.decoder.project_out")
        return hidden if project_out is None else project_out(hidden)


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

    def qkv_rows(self, layer: nn.Module, head: int, kind: str) -> tuple[Projection, torch.Tensor]:
        hd = self.attention_shape().head_dim
        offset = head * 3 * hd + {"q": 0, "k": 1, "v": 2}[kind] * hd
        return self.attention_inputs(layer)[0], torch.arange(offset, offset + hd)
