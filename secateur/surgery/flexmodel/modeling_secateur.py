"""A Llama-family causal LM whose decoder layers have their own widths and sub-blocks.

Self-contained on purpose (imports only torch and transformers): secateur copies this file and
`configuration_secateur.py` next to the weights, and the config's `auto_map` points at them.

How to use it
-------------
Shrink or remove parts of a loaded Llama model (model_type 'llama': Llama 1-3, SmolLM,
TinyLlama...; not Mistral's sliding window, Qwen's biases or Gemma), then convert and save::

    from secateur.surgery.flexmodel import LayerSpec, convert_llama
    model = convert_llama(model)            # widths read from the tensors; in place
    # or say which sub-blocks go: their modules are dropped here
    model = convert_llama(model, [LayerSpec(has_attention=False), LayerSpec(), ...])
    model.save_pretrained(out)              # writes auto_map + both code files

`LayerSpec` fields left as None are read from the layer's current tensors; widths given must
match them (shrinking tensors is `secateur.surgery.width`'s job, not this file's). The saved
directory loads anywhere with
`AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)`; with secateur imported
(`secateur.formats.registry`), plain `from_pretrained(out)` works too.

A layer without attention keeps no KV cache entry: attention layers are numbered among
themselves (`cache_index`), so the cache and the position count stay right when layer 0's
attention is gone.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    LlamaPreTrainedModel,
)

from .configuration_secateur import SecateurLlamaConfig


def _layer_config(config: SecateurLlamaConfig, **widths: int) -> SecateurLlamaConfig:
    """A shallow copy of the shared config carrying one layer's widths.

    The stock `__init__`s read their widths from the config. Calling them, rather than building
    the modules by hand, runs whatever transformers wraps around them: the kernel hub's
    `use_kernelized_func` (transformers >= 5.25 with `kernels` installed) sets in `__init__`
    what its wrapped `forward` reads, so a module built by hand fails at its first forward.
    The copy only feeds those `__init__`s; the modules keep the shared config afterwards.
    """
    layer_config = copy.copy(config)
    for key, value in widths.items():
        setattr(layer_config, key, value)
    return layer_config


class SecateurAttention(LlamaAttention):
    """Llama attention with its own head counts (the forward infers heads from the shapes)."""

    def __init__(self, config: SecateurLlamaConfig, layer_idx: int, cache_index: int) -> None:
        heads, kv = config.layer_num_heads[layer_idx], config.layer_num_kv_heads[layer_idx]
        # layer_idx is the position in the KV cache, among attention layers only
        super().__init__(_layer_config(config, num_attention_heads=heads,
                                       num_key_value_heads=kv), cache_index)
        # The shared config, not the copy: `_attn_implementation` may be set on it after the
        # modules are built (`set_attn_implementation`), and the forward reads it from here.
        self.config = config
        self.num_heads, self.num_key_value_heads = heads, kv


class SecateurMLP(LlamaMLP):
    def __init__(self, config: SecateurLlamaConfig, layer_idx: int) -> None:
        super().__init__(_layer_config(
            config, intermediate_size=config.layer_intermediate_sizes[layer_idx]))
        self.config = config  # the shared one, as in SecateurAttention


class SecateurDecoderLayer(LlamaDecoderLayer):
    """A pre-norm layer whose attention and/or MLP block (with its norm) may be absent."""

    def __init__(self, config: SecateurLlamaConfig, layer_idx: int) -> None:
        # The stock __init__ (so whatever transformers sets or wraps there applies here too) on
        # this layer's widths, the smallest valid ones for an absent block; the stock blocks it
        # builds are then replaced by this file's classes or dropped. from_pretrained builds
        # on the meta device, where the throwaway blocks cost nothing.
        super().__init__(_layer_config(
            config,
            num_attention_heads=config.layer_num_heads[layer_idx] or 1,
            num_key_value_heads=config.layer_num_kv_heads[layer_idx] or 1,
            intermediate_size=config.layer_intermediate_sizes[layer_idx] or 1,
        ), layer_idx)
        if config.layer_has_attention[layer_idx]:
            cache_index = sum(config.layer_has_attention[:layer_idx])
            self.self_attn = SecateurAttention(config, layer_idx, cache_index)
        else:
            self.self_attn = self.input_layernorm = None
        if config.layer_has_mlp[layer_idx]:
            self.mlp = SecateurMLP(config, layer_idx)
        else:
            self.mlp = self.post_attention_layernorm = None

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, position_ids=None,
                use_cache=False, position_embeddings=None, **kwargs) -> torch.Tensor:
        # the KV cache stays in kwargs under whichever name this transformers uses
        # (`past_key_values` before 5.24, `cache` after): naming one here would pass both
        if self.self_attn is not None:
            attn, _ = self.self_attn(
                hidden_states=self.input_layernorm(hidden_states),
                attention_mask=attention_mask, position_ids=position_ids,
                use_cache=use_cache, position_embeddings=position_embeddings, **kwargs,
            )
            hidden_states = hidden_states + attn
        if self.mlp is not None:
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states


class SecateurLlamaPreTrainedModel(LlamaPreTrainedModel):
    config_class = SecateurLlamaConfig
    config: SecateurLlamaConfig
    _no_split_modules = ["SecateurDecoderLayer"]
    _can_record_outputs = {"hidden_states": SecateurDecoderLayer,
                           "attentions": SecateurAttention}


class SecateurLlamaModel(SecateurLlamaPreTrainedModel, LlamaModel):
    def __init__(self, config: SecateurLlamaConfig) -> None:
        if not any(config.layer_has_attention):
            raise ValueError("a model needs at least one layer with attention")
        LlamaModel.__init__(self, config)
        self.layers = nn.ModuleList(
            [SecateurDecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        )
        self.post_init()


class SecateurLlamaForCausalLM(SecateurLlamaPreTrainedModel, LlamaForCausalLM):
    _auto_class = "AutoModelForCausalLM"

    def __init__(self, config: SecateurLlamaConfig) -> None:
        SecateurLlamaPreTrainedModel.__init__(self, config)
        self.model = SecateurLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


@dataclass
class LayerSpec:
    """One decoder layer's shape; None means 'as the layer's tensors are now'."""

    num_heads: int | None = None
    num_kv_heads: int | None = None
    intermediate_size: int | None = None
    has_attention: bool | None = None
    has_mlp: bool | None = None


def _read_spec(layer: nn.Module, head_dim: int) -> LayerSpec:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    return LayerSpec(
        num_heads=None if attn is None else attn.q_proj.out_features // head_dim,
        num_kv_heads=None if attn is None else attn.k_proj.out_features // head_dim,
        intermediate_size=None if mlp is None else mlp.down_proj.in_features,
        has_attention=attn is not None,
        has_mlp=mlp is not None,
    )


def convert_llama(model: nn.Module, spec: list[LayerSpec] | None = None,
                  ) -> SecateurLlamaForCausalLM:
    """Turn a loaded Llama-family causal LM into a `SecateurLlamaForCausalLM`, in place.

    The modules (and so the weights) are kept; only classes and config change, and the
    sub-blocks `spec` marks absent are dropped. Returns the same object, retyped.
    """
    cfg = model.config
    if getattr(cfg, "model_type", None) not in ("llama", "secateur_llama"):
        raise ValueError(f"cannot convert model_type '{cfg.model_type}': Llama-family only")
    layers = model.model.layers
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    spec = list(spec) if spec is not None else [LayerSpec() for _ in layers]
    if len(spec) != len(layers):
        raise ValueError(f"spec has {len(spec)} entries for {len(layers)} layers")
    merged: list[LayerSpec] = []
    for i, (layer, want) in enumerate(zip(layers, spec, strict=True)):
        have = _read_spec(layer, head_dim)
        if want.has_attention is False:
            layer.self_attn = layer.input_layernorm = None
        if want.has_mlp is False:
            layer.mlp = layer.post_attention_layernorm = None
        now = _read_spec(layer, head_dim)
        for key in ("num_heads", "num_kv_heads", "intermediate_size"):
            given = getattr(want, key)
            if given is not None and getattr(now, key) is not None and given != getattr(have, key):
                raise ValueError(f"layer {i}: {key}={given} but its tensors hold "
                                 f"{getattr(have, key)}; shrink the tensors first")
        merged.append(now)
    data = {k: v for k, v in cfg.to_dict().items()
            if k not in ("model_type", "architectures", "auto_map", "transformers_version")}
    with_attn = [s for s in merged if s.has_attention]
    with_mlp = [s for s in merged if s.has_mlp]
    data.update(
        head_dim=head_dim,
        num_attention_heads=max((s.num_heads for s in with_attn), default=1),
        num_key_value_heads=max((s.num_kv_heads for s in with_attn), default=1),
        intermediate_size=max((s.intermediate_size for s in with_mlp), default=0),
        layer_num_heads=[s.num_heads or 0 for s in merged],
        layer_num_kv_heads=[s.num_kv_heads or 0 for s in merged],
        layer_intermediate_sizes=[s.intermediate_size or 0 for s in merged],
        layer_has_attention=[bool(s.has_attention) for s in merged],
        layer_has_mlp=[bool(s.has_mlp) for s in merged],
    )
    # layer_types entries describe attention layers only for sliding-window models; keep as is
    new_cfg = SecateurLlamaConfig(**data)
    new_cfg._attn_implementation = cfg._attn_implementation
    new_cfg.architectures = ["SecateurLlamaForCausalLM"]
    for module in model.modules():
        if getattr(module, "config", None) is cfg:
            module.config = new_cfg
    cache_index = 0
    for i, layer in enumerate(layers):
        layer.__class__ = SecateurDecoderLayer
        if layer.self_attn is not None:
            attn = layer.self_attn
            attn.__class__ = SecateurAttention
            attn.layer_idx = cache_index
            cache_index += 1
            attn.num_heads, attn.num_key_value_heads = (merged[i].num_heads,
                                                        merged[i].num_kv_heads)
            attn.num_key_value_groups = merged[i].num_heads // merged[i].num_kv_heads
        if layer.mlp is not None:
            layer.mlp.__class__ = SecateurMLP
            layer.mlp.intermediate_size = merged[i].intermediate_size
    model.model.__class__ = SecateurLlamaModel
    model.__class__ = SecateurLlamaForCausalLM
    return model
