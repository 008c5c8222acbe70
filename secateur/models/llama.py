"""Llama-family adapter: Llama 1-3, Mistral, Qwen2/3, SmolLM; and secateur's earlier
Llama-only class with per-layer widths (`secateur_llama`), which users' folders still hold."""

from __future__ import annotations

from secateur.models.base import AttentionShape, ModelAdapter, register_adapter


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
    stock_widths = True
    # The forward infers heads from the shapes; only the GQA repeat count is stored (older
    # transformers also kept num_heads / num_key_value_heads).
    width_attributes = {"self_attn.num_key_value_groups": "groups",
                        "self_attn.num_heads": "heads",
                        "self_attn.num_key_value_heads": "kv_heads"}


@register_adapter
class SecateurLlamaAdapter(LlamaAdapter):
    """secateur's earlier Llama class with per-layer widths (secateur.surgery.flexmodel)."""

    model_types = ("secateur_llama",)

    def layer_attention_shape(self, index: int) -> AttentionShape:
        cfg = self.config
        return AttentionShape(cfg.layer_num_heads[index], cfg.layer_num_kv_heads[index],
                              cfg.head_dim)

    def set_layer_widths(self, index: int, num_heads: int, num_kv_heads: int) -> None:
        super().set_layer_widths(index, num_heads, num_kv_heads)
        self.config.layer_num_heads[index] = num_heads
        self.config.layer_num_kv_heads[index] = num_kv_heads
