"""Config for a Llama-family causal LM whose decoder layers have their own widths.

Self-contained on purpose (imports only transformers): it is copied next to the weights of a
saved model so that `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` loads
it on a machine without secateur. See `modeling_secateur.py` for how to use it.
"""

from __future__ import annotations

from transformers import LlamaConfig


class SecateurLlamaConfig(LlamaConfig):
    """`LlamaConfig` plus one entry per decoder layer for each width and sub-block.

    `layer_num_heads`, `layer_num_kv_heads`, `layer_intermediate_sizes`: per-layer query heads,
    KV heads and MLP channels. `layer_has_attention` / `layer_has_mlp`: False where that
    sub-block was removed (the layer then adds nothing from it, and has no norm for it).
    The scalar `num_attention_heads` / `num_key_value_heads` / `intermediate_size` keep the
    widest layer's values; `head_dim` is always explicit because it no longer follows from
    hidden_size / num_attention_heads.
    """

    model_type = "secateur_llama"
    _auto_class = "AutoConfig"

    def __init__(
        self,
        layer_num_heads: list[int] | None = None,
        layer_num_kv_heads: list[int] | None = None,
        layer_intermediate_sizes: list[int] | None = None,
        layer_has_attention: list[bool] | None = None,
        layer_has_mlp: list[bool] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        n = self.num_hidden_layers
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.layer_num_heads = list(layer_num_heads or [self.num_attention_heads] * n)
        self.layer_num_kv_heads = list(layer_num_kv_heads or [self.num_key_value_heads] * n)
        self.layer_intermediate_sizes = list(layer_intermediate_sizes
                                             or [self.intermediate_size] * n)
        self.layer_has_attention = [bool(x) for x in (layer_has_attention or [True] * n)]
        self.layer_has_mlp = [bool(x) for x in (layer_has_mlp or [True] * n)]
        for key in ("layer_num_heads", "layer_num_kv_heads", "layer_intermediate_sizes",
                    "layer_has_attention", "layer_has_mlp"):
            if len(getattr(self, key)) != n:
                raise ValueError(f"{key} has {len(getattr(self, key))} entries for {n} layers")
        for i, (h, kv) in enumerate(zip(self.layer_num_heads, self.layer_num_kv_heads,
                                        strict=True)):
            if self.layer_has_attention[i] and (kv < 1 or h < kv or h % kv):
                raise ValueError(f"layer {i}: {h} query heads cannot share {kv} KV heads")
