"""Llama-family adapter: Llama 1-3, Mistral, Qwen2/3, SmolLM."""

from __future__ import annotations

from torch import nn

from secateur.models.base import (
    DecodeLayout,
    ModelAdapter,
    RMSNormSpec,
    get_submodule,
    register_adapter,
)


def _rms_norm(module: nn.Module | None) -> RMSNormSpec | None:
    """The spec of a Llama-style RMSNorm (weight times the normalised input), else None."""
    eps = getattr(module, "variance_epsilon", None)
    weight = getattr(module, "weight", None)
    if eps is None or weight is None:
        return None
    return RMSNormSpec(weight, float(eps))


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
    extra_norms = ("self_attn.q_norm", "self_attn.k_norm")  # Qwen3's per-head norms
    stock_widths = True
    gguf_architecture = "llama"  # "deci" when layers differ (secateur.formats.gguf)
    # The forward infers heads from the shapes; only the GQA repeat count is stored (older
    # transformers also kept num_heads / num_key_value_heads).
    width_attributes = {"self_attn.num_key_value_groups": "groups",
                        "self_attn.num_heads": "heads",
                        "self_attn.num_key_value_heads": "kv_heads"}

    def decode_layout(self, layer: nn.Module) -> DecodeLayout | None:
        if self.heterogeneous_class or getattr(self.config, "hidden_act", None) != "silu":
            return None
        attn = get_submodule(layer, "self_attn")
        parts = {name: get_submodule(layer, path) for name, path in zip(
            ("q", "k", "v", "o", "gate", "up", "down"),
            (*self.attn_in, self.attn_out, *self.mlp_in, self.mlp_out), strict=True)}
        norms = [_rms_norm(get_submodule(layer, p)) for p in (self.attn_norm, self.mlp_norm)]
        if attn is None or None in parts.values() or None in norms:
            return None
        qk = [get_submodule(attn, p) for p in ("q_norm", "k_norm")]
        qk_specs = [_rms_norm(m) for m in qk]
        if any(m is not None and spec is None for m, spec in zip(qk, qk_specs, strict=True)):
            return None
        return DecodeLayout(norms[0], norms[1], **parts, head_dim=attn.head_dim,
                            scaling=float(attn.scaling), cache_index=attn.layer_idx,
                            q_norm=qk_specs[0], k_norm=qk_specs[1],
                            # Qwen2/3 set it per layer; Mistral's layers read the config's
                            window=getattr(attn, "sliding_window",
                                           getattr(self.config, "sliding_window", None)))

