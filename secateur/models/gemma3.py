"""Gemma 3 adapter: Llama's projections, sandwich norms, logit softcap, BOS on every window."""

from __future__ import annotations

import torch
from torch import nn

from secateur.models.base import DecodeLayout, register_adapter
from secateur.models.llama import LlamaAdapter


@register_adapter
class Gemma3Adapter(LlamaAdapter):
    """Gemma 3: Llama's projections, sandwich norms, and a softcap on the final logits."""

    model_types = ("gemma3_text",)
    mlp_norm = "pre_feedforward_layernorm"
    extra_norms = ("post_attention_layernorm", "post_feedforward_layernorm",
                   "self_attn.q_norm", "self_attn.k_norm")
    # its perplexity triples without BOS (15.2 vs 49.7 on wiki at 256 tokens)
    bos_policy = "each"
    gguf_architecture = "gemma3"
    norm_weight_offset = 1.0

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().logits_from_hidden(hidden)
        cap = getattr(self.config, "final_logit_softcapping", None)
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def decode_layout(self, layer: nn.Module) -> DecodeLayout | None:
        return None  # (1 + weight) norms, sandwich norms, GELU: not the Llama step
