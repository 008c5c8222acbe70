"""A Llama-shaped model as the exporters see it: per-layer widths and tensors by their HF names.

Both exporters accept exactly the Llama block (RMSNorm, q/k/v/o without biases, SwiGLU
gate/up/down, rotary attention) with per-layer head counts, MLP widths and removed attention
or MLP branches. Whether a model is that shape is decided from its tensors and config fields,
not from its model type: a tensor the Llama layout has no name for (a bias, a q/k norm, an
extra norm) or a config feature it cannot express (sliding window, another activation) is
refused in one line before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from secateur.errors import SecateurError
from secateur.quant.state import weights_state_dict

ROPE_TYPES = ("default", "llama3")  # what vLLM's DeciLM and llama.cpp both reproduce exactly


@dataclass(frozen=True)
class LayerShape:
    """One decoder layer; 0 heads / 0 channels means that branch was removed."""

    num_heads: int
    num_kv_heads: int
    intermediate_size: int

    @property
    def has_attention(self) -> bool:
        return self.num_heads > 0

    @property
    def has_mlp(self) -> bool:
        return self.intermediate_size > 0


@dataclass
class DecoderDims:
    """What every exported decoder's file header states, whatever its architecture."""

    name: str
    hidden_size: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    max_position_embeddings: int


@dataclass
class LlamaLayout(DecoderDims):
    rope: dict[str, Any]  # rope_type, rope_theta and the type's own fields
    tie_word_embeddings: bool
    special_ids: dict[str, int | list[int] | None]  # bos/eos/pad token ids from the config
    layers: list[LayerShape]
    tensors: dict[str, torch.Tensor]  # Llama names: model.layers.0.self_attn.q_proj.weight ...

    @property
    def is_stock(self) -> bool:
        """Every layer complete and the same width: a plain Llama config describes it."""
        first = self.layers[0]
        return first.has_attention and first.has_mlp and all(s == first for s in self.layers)


def layer_shapes(config: Any, tensors: dict[str, torch.Tensor], head_dim: int
                 ) -> list[LayerShape]:
    """Per-layer widths read from the tensors themselves (a missing q_proj / gate_proj is a
    removed branch), so they do not depend on how a pruned model's config records them.

    The one place that knows how a pruned Llama layer looks; if secateur's model classes
    change how they store removed branches, this is the function to adapt.
    """
    out = []
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        q, k, gate = (tensors.get(p + n) for n in ("self_attn.q_proj.weight",
                                                    "self_attn.k_proj.weight",
                                                    "mlp.gate_proj.weight"))
        for name, t in (("q_proj", q), ("k_proj", k)):
            if t is not None and t.shape[0] % head_dim:
                raise SecateurError(f"layer {i}: {name} has {t.shape[0]} rows, not whole heads "
                                    f"of {head_dim}")
        heads = 0 if q is None else q.shape[0] // head_dim
        kv = 0 if k is None or q is None else k.shape[0] // head_dim
        out.append(LayerShape(heads, kv, 0 if gate is None else gate.shape[0]))
    return out


def expected_shapes(layout_dims: tuple[int, int, int], layers: list[LayerShape],
                    tied: bool) -> dict[str, tuple[int, ...]]:
    """The Llama tensor names and (out, in) shapes that `layers` call for."""
    hidden, head_dim, vocab = layout_dims
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden),
                                          "model.norm.weight": (hidden,)}
    if not tied:
        shapes["lm_head.weight"] = (vocab, hidden)
    for i, s in enumerate(layers):
        p = f"model.layers.{i}."
        if s.has_attention:
            shapes[p + "input_layernorm.weight"] = (hidden,)
            shapes[p + "self_attn.q_proj.weight"] = (s.num_heads * head_dim, hidden)
            shapes[p + "self_attn.k_proj.weight"] = (s.num_kv_heads * head_dim, hidden)
            shapes[p + "self_attn.v_proj.weight"] = (s.num_kv_heads * head_dim, hidden)
            shapes[p + "self_attn.o_proj.weight"] = (hidden, s.num_heads * head_dim)
        if s.has_mlp:
            shapes[p + "post_attention_layernorm.weight"] = (hidden,)
            shapes[p + "mlp.gate_proj.weight"] = (s.intermediate_size, hidden)
            shapes[p + "mlp.up_proj.weight"] = (s.intermediate_size, hidden)
            shapes[p + "mlp.down_proj.weight"] = (hidden, s.intermediate_size)
    return shapes


def _rope(config: Any) -> dict[str, Any]:
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:  # configs from before transformers 5 keep rope_theta / rope_scaling
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    if params["rope_type"] not in ROPE_TYPES:
        raise SecateurError(f"rope type '{params['rope_type']}' is not exported (supported: "
                            f"{', '.join(ROPE_TYPES)})")
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise SecateurError("partial rotary embeddings are not exported: the Llama layout "
                            "rotates the whole head")
    return params


def _check_config(config: Any) -> None:
    act = getattr(config, "hidden_act", None)
    if act != "silu":
        raise SecateurError(f"the export writes the Llama block (SwiGLU with silu); this model's "
                            f"activation is '{act}'")
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        raise SecateurError("sliding-window attention is not exported: the Llama/DeciLM layout "
                            "attends to the whole context")


def read_layout(model: nn.Module, name: str) -> LlamaLayout:
    """The model's widths and tensors in the Llama layout; one line if it is not that shape."""
    config = model.config
    tied = bool(getattr(config, "tie_word_embeddings", False))
    tensors = {k: v.detach() for k, v in weights_state_dict(model).items()}
    if tied:
        tensors.pop("lm_head.weight", None)
    try:
        hidden = config.hidden_size
        head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
        dims = (hidden, head_dim, config.vocab_size)
        layers = layer_shapes(config, tensors, head_dim)
    except (AttributeError, TypeError) as err:
        raise SecateurError(f"'{name}' has no Llama-style config ({err}): the export covers "
                            "Llama-family models") from None
    for i, s in enumerate(layers):  # a removed branch's norm (if a class keeps it) feeds nothing
        if not s.has_attention:
            tensors.pop(f"model.layers.{i}.input_layernorm.weight", None)
        if not s.has_mlp:
            tensors.pop(f"model.layers.{i}.post_attention_layernorm.weight", None)
    want = expected_shapes(dims, layers, tied)
    extra = sorted(set(tensors) - set(want))
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise SecateurError(f"'{name}' is not Llama-shaped: it has '{extra[0]}'{more}, which the "
                            "Llama/DeciLM layout has no place for")
    missing = sorted(set(want) - set(tensors))
    if missing:
        raise SecateurError(f"'{name}' lacks '{missing[0]}' that its config calls for")
    for key, shape in want.items():
        if tuple(tensors[key].shape) != shape:
            raise SecateurError(f"'{key}' has shape {tuple(tensors[key].shape)} but the config "
                                f"says {shape}: the model and its config disagree")
    for i, s in enumerate(layers):
        if s.has_attention and (s.num_kv_heads == 0 or s.num_heads % s.num_kv_heads):
            raise SecateurError(f"layer {i}: {s.num_heads} query heads cannot share "
                                f"{s.num_kv_heads} KV heads")
    _check_config(config)
    if not any(s.has_attention for s in layers):
        raise SecateurError("every attention block was removed: no runtime runs such a model")
    return LlamaLayout(
        name=name, hidden_size=hidden, head_dim=head_dim, vocab_size=config.vocab_size,
        rms_norm_eps=float(config.rms_norm_eps),
        max_position_embeddings=int(getattr(config, "max_position_embeddings", 2048)),
        rope=_rope(config), tie_word_embeddings=tied,
        special_ids={k: getattr(config, k, None)
                     for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
        layers=layers, tensors=tensors)
