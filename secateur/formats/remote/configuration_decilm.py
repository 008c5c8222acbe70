"""Config for the DeciLM / Nemotron-NAS layout (model_type 'nemotron-nas').

Written by secateur next to exported weights; self-contained (imports only transformers) so
that `AutoConfig.from_pretrained(dir, trust_remote_code=True)` (and so vLLM's `nemotron_nas`
model) reads the per-layer `block_configs` on a machine without secateur.
`intermediate_size` and `num_key_value_heads` hold the widest layer's values.

Each entry of `block_configs` describes one decoder layer:
- `attention.no_op`: the layer has no attention branch (and no input_layernorm);
  otherwise `attention.n_heads_in_group` query heads share each KV head, so the layer has
  `num_attention_heads // n_heads_in_group` KV heads.
- `ffn.no_op`: the layer has no MLP branch (and no post_attention_layernorm); otherwise
  its MLP width is `ffn_mult_to_intermediate_size(ffn.ffn_mult, hidden_size)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import LlamaConfig


def _find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """DeciLM's rule: two thirds of ffn_mult * hidden, rounded up to a multiple of 256."""
    return _find_multiple(int(2 * ffn_mult * hidden_size / 3), 256)


def _known(cls: type, d: dict) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    no_op: bool = False
    replace_with_linear: bool = False
    n_heads_in_group: int | None = None


@dataclasses.dataclass(frozen=True)
class FFNConfig:
    no_op: bool = False
    replace_with_linear: bool = False
    ffn_mult: float | None = None


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    attention: AttentionConfig
    ffn: FFNConfig

    @classmethod
    def from_dict(cls, d: dict) -> BlockConfig:
        return cls(AttentionConfig(**_known(AttentionConfig, d.get("attention", {}))),
                   FFNConfig(**_known(FFNConfig, d.get("ffn", {}))))


class DeciLMConfig(LlamaConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs: list[dict] | list[BlockConfig] | None = None,
                 **kwargs: Any) -> None:
        # Per-layer values live in block_configs; config.json holds null for the global ones,
        # which transformers >= 5 refuses to store: they become the widest layer's below.
        for key in ("intermediate_size", "num_key_value_heads"):
            if kwargs.get(key, 0) is None:
                del kwargs[key]
        super().__init__(**kwargs)
        blocks = [b if isinstance(b, BlockConfig) else BlockConfig.from_dict(b)
                  for b in (block_configs or [])]
        if blocks and len(blocks) != self.num_hidden_layers:
            raise ValueError(f"{len(blocks)} block_configs for {self.num_hidden_layers} layers")
        self.block_configs = blocks
        sizes = [ffn_mult_to_intermediate_size(b.ffn.ffn_mult, self.hidden_size)
                 for b in blocks if not b.ffn.no_op]
        kv = [self.num_attention_heads // b.attention.n_heads_in_group
              for b in blocks if not b.attention.no_op]
        self.intermediate_size = max(sizes, default=self.intermediate_size)
        self.num_key_value_heads = max(kv, default=self.num_key_value_heads)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["block_configs"] = [dataclasses.asdict(b) for b in self.block_configs]
        return out
