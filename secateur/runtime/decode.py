"""A short path for decoding one token per step through Llama-family layers.

Why: at batch 1 a 4-bit smollm2 layer's kernels take ~0.4 ms on a 2-core AVX2 CPU, and
transformers' layer forward adds about as much again in small tensor ops and Python: RMSNorm
as seven ops, the rotary embedding as slices and concatenations, the attention dispatcher,
CPU flash attention for a single query (~0.1-0.2 ms a call), keyword-argument decorators. With
weights four times smaller that overhead, not the bytes, decides decode speed.

`install_decode_path(model)` gives each layer the adapter describes (`ModelAdapter.
decode_layout`) a forward that runs one new token in about twelve calls (RMSNorm, rotary,
one-query grouped attention and the SiLU gate as single calls of secateur's compiled helpers,
torch ops where those are missing or the dtype is not float32; fused q/k/v and gate/up
kernels where the int4 runtime fused them) and hands everything else to the layer's own
forward: prompts, any attention mask (padding, eager attention, a sliding window that
matters), `output_attentions`. Same arithmetic as the layer's
own forward up to float summation order; transformers' cache object is updated as usual, so
`generate` and its cache classes work unchanged.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from secateur.models.base import DecodeLayout, RMSNormSpec
from secateur.runtime import avx2
from secateur.runtime.base import adapted_layers

LAYOUT_ATTR = "_secateur_decode_layout"


def _norm(x: torch.Tensor, spec: RMSNormSpec) -> torch.Tensor:
    kernels = _glue(x)
    if kernels is not None:
        return kernels.rms_norm(x, spec.weight, spec.eps)
    return F.rms_norm(x, (x.shape[-1],), spec.weight, spec.eps)


def _glue(x: torch.Tensor):
    """secateur's compiled decode helpers for float32 tensors (`runtime.avx2`), else None."""
    return avx2.kernels() if x.dtype == torch.float32 else None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, transformers' (non-interleaved) rotary layout."""
    kernels = _glue(x)
    if kernels is not None:
        x = x.contiguous()
        kernels.rotary_(x, cos.reshape(-1, x.shape[-1]), sin.reshape(-1, x.shape[-1]))
        return x
    half = x.shape[-1] // 2
    return torch.cat((x[..., half:].neg(), x[..., :half]), -1).mul_(sin).add_(x * cos)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
    """Softmax attention of one query per sequence: q (batch, heads, head_dim), k and v
    (batch, kv heads, keys, head_dim) -> (batch, heads * head_dim)."""
    kernels = _glue(q)
    if kernels is not None and k.dtype == v.dtype == torch.float32:
        return kernels.attend_one(q, k, v, scaling)
    batch, hd, kv_heads = q.shape[0], q.shape[-1], k.shape[1]
    # grouped-query attention: each KV head's query group as one block of matmul rows
    scores = torch.matmul(q.reshape(batch, kv_heads, -1, hd), k.transpose(-1, -2))
    probs = scores.mul_(scaling).softmax(-1, dtype=torch.float32).to(v.dtype)
    return torch.matmul(probs, v).reshape(batch, -1)


def _gated(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    kernels = _glue(gate)
    if kernels is not None and up.dtype == torch.float32:
        return kernels.silu_mul(gate, up)
    return F.silu(gate).mul_(up)


def _projections(first: nn.Module, second: nn.Module, third: nn.Module | None,
          x: torch.Tensor) -> list[torch.Tensor]:
    """The projections of one input; one kernel call where the int4 runtime fused them."""
    fused = getattr(first, "fused", None)  # `runtime.fuse.FusedOutput` holding the group
    count = 2 if third is None else 3
    if fused is not None and len(fused.splits) == count:
        return fused(x)
    return [m(x) for m in (first, second, third)[:count]]


def decode_step(layout: DecodeLayout, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: Any | None) -> torch.Tensor:
    """One layer for one new token per sequence: x (batch, 1, hidden), no padding."""
    batch, hd = x.shape[0], layout.head_dim
    h = _norm(x, layout.attn_norm)
    q, k, v = _projections(layout.q, layout.k, layout.v, h)
    q, k, v = (t.reshape(batch, -1, hd) for t in (q, k, v))  # (batch, heads, head_dim)
    if layout.q_norm is not None:
        q = _norm(q, layout.q_norm)
    if layout.k_norm is not None:
        k = _norm(k, layout.k_norm)
    cos, sin = cos.reshape(-1, 1, hd), sin.reshape(-1, 1, hd)  # one row, or one per sequence
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    k, v = k.unsqueeze(2), v.unsqueeze(2)  # (batch, kv heads, 1, head_dim)
    if cache is not None:
        k, v = cache.update(k, v, layout.cache_index)
    if layout.window is not None:
        k, v = k[:, :, -layout.window:], v[:, :, -layout.window:]
    x = x + layout.o(_attend(q, k, v, layout.scaling).view(batch, 1, -1))
    h = _norm(x, layout.mlp_norm)
    gate, up = _projections(layout.gate, layout.up, None, h)
    return x + layout.down(_gated(gate, up))


def _decode_forward(self: nn.Module, hidden_states: torch.Tensor, *args: Any,
                    **kwargs: Any) -> Any:
    """The layer's forward with the one-token path in front of it."""
    embeddings = kwargs.get("position_embeddings")
    if (args or hidden_states.shape[1] != 1 or kwargs.get("attention_mask") is not None
            or embeddings is None or kwargs.get("output_attentions")):
        return type(self).forward(self, hidden_states, *args, **kwargs)
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return decode_step(getattr(self, LAYOUT_ATTR), hidden_states, *embeddings, cache)


def install_decode_path(model: nn.Module) -> int:
    """Give every layer the model's adapter can describe the one-token path; how many."""
    found = adapted_layers(model)
    if found is None:
        return 0
    adapter, layers = found
    done = 0
    for layer in layers:
        layout = adapter.decode_layout(layer)
        if layout is None:
            continue
        # plain attributes, not submodules: the layout's modules are already the layer's own;
        # a bound method so that deepcopy rebinds it (and the layout) to the copy
        layer.__dict__[LAYOUT_ATTR] = layout
        layer.forward = types.MethodType(_decode_forward, layer)
        done += 1
    return done


def remove_decode_path(model: nn.Module) -> int:
    """Back to every layer's own forward; how many layers had the path."""
    done = 0
    for module in model.modules():
        if LAYOUT_ATTR in module.__dict__:
            del module.__dict__[LAYOUT_ATTR]
            module.__dict__.pop("forward", None)
            done += 1
    return done
