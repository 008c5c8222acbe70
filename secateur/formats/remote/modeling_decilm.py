"""A transformers model for the DeciLM / Nemotron-NAS layout (`block_configs`), so that a
folder secateur exported for vLLM also loads with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`.

Self-contained (imports only torch and transformers); written by secateur next to the
weights. Each layer follows its `block_configs` entry as vLLM's DeciLMDecoderLayer does:
attention with `num_attention_heads // n_heads_in_group` KV heads unless `attention.no_op`,
then a SwiGLU MLP of `ffn_mult_to_intermediate_size(ffn_mult, hidden)` channels unless
`ffn.no_op`; a no-op branch has no weights and no norm. Attention layers are numbered among
themselves in the KV cache, so a first layer without attention keeps the cache right.
"""

from __future__ import annotations

import copy

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

from .configuration_decilm import DeciLMConfig, ffn_mult_to_intermediate_size


def _layer_config(config: DeciLMConfig, **widths: int) -> DeciLMConfig:
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


class DeciLMAttention(LlamaAttention):
    def __init__(self, config: DeciLMConfig, num_kv_heads: int, cache_index: int) -> None:
        # layer_idx is the position in the KV cache, among attention layers only
        super().__init__(_layer_config(config, num_key_value_heads=num_kv_heads), cache_index)
        # The shared config, not the copy: `_attn_implementation` may be set on it after the
        # modules are built (`set_attn_implementation`), and the forward reads it from here.
        self.config = config


class DeciLMMLP(LlamaMLP):
    def __init__(self, config: DeciLMConfig, intermediate_size: int) -> None:
        super().__init__(_layer_config(config, intermediate_size=intermediate_size))
        self.config = config  # the shared one, as in DeciLMAttention


class DeciLMDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: DeciLMConfig, layer_idx: int) -> None:
        block = config.block_configs[layer_idx]
        kv = (None if block.attention.no_op
              else config.num_attention_heads // block.attention.n_heads_in_group)
        size = (None if block.ffn.no_op
                else ffn_mult_to_intermediate_size(block.ffn.ffn_mult, config.hidden_size))
        # The stock __init__ (so whatever transformers sets or wraps there applies here too) on
        # this layer's widths, the smallest valid ones for a no-op branch; the stock blocks it
        # builds are then replaced by this file's classes or dropped. from_pretrained builds
        # on the meta device, where the throwaway blocks cost nothing.
        super().__init__(_layer_config(config, num_key_value_heads=kv or 1,
                                       intermediate_size=size or 1), layer_idx)
        if kv is None:
            self.self_attn = self.input_layernorm = None
        else:
            cache_index = sum(not b.attention.no_op for b in config.block_configs[:layer_idx])
            self.self_attn = DeciLMAttention(config, kv, cache_index)
        if size is None:
            self.mlp = self.post_attention_layernorm = None
        else:
            self.mlp = DeciLMMLP(config, size)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        # kwargs (mask, positions, rotary embeddings, the cache under whichever name this
        # transformers version uses) go to the attention untouched
        if self.self_attn is not None:
            attn, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
            hidden_states = hidden_states + attn
        if self.mlp is not None:
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states


class DeciLMPreTrainedModel(LlamaPreTrainedModel):
    config_class = DeciLMConfig
    config: DeciLMConfig
    _no_split_modules = ["DeciLMDecoderLayer"]
    _can_record_outputs = {"hidden_states": DeciLMDecoderLayer, "attentions": DeciLMAttention}


class DeciLMModel(DeciLMPreTrainedModel, LlamaModel):
    def __init__(self, config: DeciLMConfig) -> None:
        LlamaModel.__init__(self, config)
        self.layers = nn.ModuleList(
            [DeciLMDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.post_init()


class DeciLMForCausalLM(DeciLMPreTrainedModel, LlamaForCausalLM):
    _auto_class = "AutoModelForCausalLM"

    def __init__(self, config: DeciLMConfig) -> None:
        DeciLMPreTrainedModel.__init__(self, config)
        self.model = DeciLMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
