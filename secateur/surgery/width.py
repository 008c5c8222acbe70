"""Physically remove attention heads and MLP channels: tensors shrink, the config follows.

Which rows and columns belong together comes from the adapter's `GroupSet`s; this module only
slices tensors and rewrites the config. Uniform widths keep the stock config class where it
can say them (smaller `num_attention_heads` / `num_key_value_heads` / `intermediate_size`,
explicit `head_dim`: Llama-family configs), so plain `from_pretrained` loads the result;
per-layer widths, and any widths in families whose head_dim follows from hidden / heads
(GPT-2, OPT, GPT-NeoX), turn the model into secateur's generic class (`surgery/flex.py`),
whose `save_pretrained` writes `auto_map` and its code file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from secateur.errors import SecateurError
from secateur.models.base import GroupSet, ModelAdapter, Projection
from secateur.models.mask import select_mask


@dataclass(frozen=True)
class LayerWidth:
    num_heads: int
    num_kv_heads: int
    intermediate_size: int


def _replace(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))


def keep_rows(proj: Projection, keep: torch.Tensor) -> None:
    """Keep output rows `keep` (sorted) of a projection, bias included."""
    m = proj.module
    if proj.transposed:  # Conv1D: weight is (in, out)
        _replace(m, "weight", m.weight.data[:, keep])
        select_mask(m, keep, 1)
        if hasattr(m, "nf"):
            m.nf = len(keep)
    else:
        _replace(m, "weight", m.weight.data[keep])
        select_mask(m, keep, 0)
        if hasattr(m, "out_features"):
            m.out_features = len(keep)
    if getattr(m, "bias", None) is not None:
        _replace(m, "bias", m.bias.data[keep])


def keep_cols(proj: Projection, keep: torch.Tensor) -> None:
    """Keep input columns `keep` (sorted) of a projection."""
    m = proj.module
    if proj.transposed:
        _replace(m, "weight", m.weight.data[keep])
        select_mask(m, keep, 0)
    else:
        _replace(m, "weight", m.weight.data[:, keep])
        select_mask(m, keep, 1)
        if hasattr(m, "in_features"):
            m.in_features = len(keep)


def remove_groups(groups: GroupSet, remove: torch.Tensor) -> None:
    """Drop the groups where `remove` (bool, one per group) is True, from every member."""
    if not bool(remove.any()):
        return
    # One projection may hold several members (GPT-2's fused qkv): drop their union at once.
    drop: dict[int, tuple[Projection, str, list[torch.Tensor]]] = {}
    for kind, members in (("rows", groups.rows), ("cols", groups.cols)):
        for proj, idx in members:
            key = id(proj.module) * 2 + (kind == "cols")
            drop.setdefault(key, (proj, kind, []))[2].append(idx[remove].reshape(-1))
    for proj, kind, parts in drop.values():
        n = proj.out_features if kind == "rows" else proj.in_features
        keep = torch.ones(n, dtype=torch.bool)
        keep[torch.cat(parts)] = False
        (keep_rows if kind == "rows" else keep_cols)(proj, keep.nonzero().squeeze(1))


def shrink_layer(adapter: ModelAdapter, index: int, remove_heads: torch.Tensor | None,
                 remove_channels: torch.Tensor | None, gqa_mode: str = "kv") -> LayerWidth:
    """Remove head groups and MLP channels of one layer; returns its new widths."""
    if not adapter.width_surgery:
        raise SecateurError(f"width pruning has no group rules for "
                            f"'{adapter.config.model_type}'")
    shape = adapter.layer_attention_shape(index)
    heads, kv = shape.num_heads, shape.num_kv_heads
    if remove_heads is not None and bool(remove_heads.any()):
        groups = adapter.head_groups(index, gqa_mode)
        if bool(remove_heads.all()):
            raise SecateurError(f"this would remove every attention head of layer {index}: "
                                "lower --ratio or protect fewer layers")
        if groups.kind == "query-heads":
            per_kv = torch.bincount(groups.kv_of[remove_heads], minlength=kv)
            if not bool((per_kv == per_kv[0]).all()):
                raise ValueError("query-head removal must be even across KV groups")
            heads -= int(remove_heads.sum())
        else:
            share = heads // kv
            kv -= int(remove_heads.sum())
            heads = kv * share
        remove_groups(groups, remove_heads)
        adapter.set_layer_widths(index, heads, kv)
    if remove_channels is not None and bool(remove_channels.any()):
        if bool(remove_channels.all()):
            raise SecateurError(f"this would remove every MLP channel of layer {index}: "
                                "lower --ratio or protect fewer layers")
        remove_groups(adapter.mlp_groups(index), remove_channels)
    return LayerWidth(heads, kv, adapter.mlp_output(adapter.layers[index]).in_features)


def current_widths(adapter: ModelAdapter) -> list[LayerWidth]:
    """Every layer's widths from its tensors; a removed branch counts as width 0."""
    out = []
    for i, layer in enumerate(adapter.layers):
        shape = adapter.layer_attention_shape(i)
        mlp = adapter.linears(layer).get(adapter.mlp_out)
        out.append(LayerWidth(shape.num_heads, shape.num_kv_heads,
                              0 if mlp is None else mlp.in_features))
    return out


def rewrite_config(model: nn.Module, adapter: ModelAdapter) -> str:
    """Make the config describe the shrunk tensors. Returns 'stock', or 'secateur' when the
    model is now secateur's generic class."""
    widths = current_widths(adapter)
    cfg = model.config
    if len(set(widths)) == 1 and adapter.stock_widths and not adapter.heterogeneous_class:
        w = widths[0]
        cfg.head_dim = adapter.attention_shape().head_dim  # no longer hidden / heads
        cfg.num_attention_heads = w.num_heads
        cfg.num_key_value_heads = w.num_kv_heads
        cfg.intermediate_size = w.intermediate_size
        return "stock"
    from secateur.surgery.flex import to_flex

    to_flex(model, adapter)
    adapter.config = model.config
    return model.config.model_type
