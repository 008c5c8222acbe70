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

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
)

from .configuration_decilm import DeciLMConfig, ffn_mult_to_intermediate_size


class DeciLMAttention(LlamaAttention):
    def __init__(self, config: DeciLMConfig, num_kv_heads: int, cache_index: int) -> None:
        nn.Module.__init__(self)
        self.config = config
        self.layer_idx = cache_index
        self.head_dim = config.head_dim
        heads = config.num_attention_heads
        self.num_key_value_groups = heads // num_kv_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        h, d = config.hidden_size, self.head_dim
        self.q_proj = nn.Linear(h, heads * d, bias=False)
        self.k_proj = nn.Linear(h, num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(heads * d, h, bias=False)


class DeciLMMLP(LlamaMLP):
    def __init__(self, config: DeciLMConfig, intermediate_size: int) -> None:
        nn.Module.__init__(self)
        self.config = config
        self.hidden_size = config.hidden_size
        self.intermediate_size = intermediate_size
        self.gate_proj = nn.Linear(self.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(self.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, self.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]


class DeciLMDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: DeciLMConfig, layer_idx: int) -> None:
        nn.Module.__init__(self)
        block = config.block_configs[layer_idx]
        self.hidden_size = config.hidden_size
        self.gradient_checkpointing = False
        eps = config.rms_norm_eps
        self.self_attn = self.input_layernorm = None
        self.mlp = self.post_attention_layernorm = None
        if not block.attention.no_op:
            kv = config.num_attention_heads // block.attention.n_heads_in_group
            cache_index = sum(not b.attention.no_op for b in config.block_configs[:layer_idx])
            self.self_attn = DeciLMAttention(config, kv, cache_index)
            self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=eps)
        if not block.ffn.no_op:
            size = ffn_mult_to_intermediate_size(block.ffn.ffn_mult, config.hidden_size)
            self.mlp = DeciLMMLP(config, size)
            self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=eps)

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
