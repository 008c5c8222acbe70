"""LLM-Pruner-style width pruning (Ma et al., 2023): remove coupled heads and MLP channels.

Groups (a KV head with its query heads, or query heads evenly per KV group; an MLP channel's
gate/up rows and down column) come from the adapter. Each group is scored by an estimator:

- `taylor`: LLM-Pruner's element-wise first-order "param_first": |w * dL/dw| summed over the
  group, with dL/dw the LM-loss gradient accumulated over the calibration windows;
- `l2`: sum of squared weights of the group (LLM-Pruner's `l2` magnitude importance);
- `activation`: Wanda-sp / FLAP-style |W_ij| * ||X_j|| summed over the group, gradient-free;
- `random`: a seeded baseline.

The share of decoder parameters to remove (`--ratio`) is spread over the unprotected layers
either uniformly (same share of heads and channels per layer) or by importance (a global
ranking of per-parameter scores; per-layer widths). Like LLM-Pruner, the first and last layers
are left alone by default (`protect_first`, `protect_last`), which also gives per-layer widths.
Per-layer widths save as secateur's generic model class (any family, `surgery/flex.py`); with
both protections at 0 and uniform allocation every layer has the same widths, and a
Llama-family config states them as a stock config (GPT-2, OPT and GPT-NeoX derive head_dim
from hidden / heads, so their shrunk heads need secateur's class too).
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from tqdm.auto import tqdm

from secateur.config import MethodConfig, StepKind
from secateur.errors import SecateurError
from secateur.methods.base import ModelMethod, PruneContext, register_method
from secateur.models.base import GroupSet, ModelAdapter, Projection
from secateur.stats import ColumnSquares
from secateur.surgery.width import rewrite_config, shrink_layer

Importance = Literal["taylor", "l2", "activation", "random"]


class LLMPrunerConfig(MethodConfig):
    """LLM-Pruner width pruning: remove coupled heads and MLP channels."""

    method = "llm-pruner"
    kind: ClassVar[StepKind] = "prune"

    ratio: float = Field(gt=0, lt=1, description="Share of decoder parameters to remove.")
    importance: Importance = Field("taylor", description="Group importance estimator.")
    allocation: Literal["uniform", "importance"] = Field(
        "uniform", description="uniform (same share per layer) or importance (per-layer "
                               "widths from a global ranking).")
    gqa_mode: Literal["kv", "query"] = Field(
        "kv", description="kv (drop a KV head with its query heads) or query (query heads "
                          "evenly per KV group).")
    # None: LLM-Pruner's middle range, about n/8 first and n/16 last layers left alone
    # (its Llama-7B recipe prunes layers 4..29 of 32); 0/0 prunes every layer uniformly.
    protect_first: int | None = Field(None, ge=0, description="Leave the first K layers "
                                                              "(default ~n/8).")
    protect_last: int | None = Field(None, ge=0, description="Leave the last K layers "
                                                             "(default ~n/16).")

    multiple_of: int = Field(1, ge=1, description="Keep each pruned layer's MLP width a "
                             "multiple of this (nearest): 32 lets every llama.cpp block type "
                             "hold ffn_down, 256 the K-quants; 1: LLM-Pruner's own widths.")

    def protected(self, num_layers: int) -> tuple[int, int]:
        """Layers left alone at each end."""
        first = round(num_layers / 8)
        last = round(num_layers / 16)
        return (first if self.protect_first is None else self.protect_first,
                last if self.protect_last is None else self.protect_last)


# -- importance -----------------------------------------------------------------------------
ElementScores = dict[str, torch.Tensor]  # projection name -> per-element score (out, in)


def group_scores(groups: GroupSet, scores: ElementScores) -> torch.Tensor:
    """Sum of element scores over each group's rows and columns."""
    total = torch.zeros(groups.size, dtype=torch.float64)
    for proj, idx in groups.rows:
        per_row = scores[proj.name].double().sum(1)
        total += per_row[idx].sum(1)
    for proj, idx in groups.cols:
        per_col = scores[proj.name].double().sum(0)
        total += per_col[idx].sum(1)
    return total


def _layer_groups(adapter: ModelAdapter, index: int, gqa_mode: str) -> tuple[GroupSet, GroupSet]:
    return adapter.head_groups(index, gqa_mode), adapter.mlp_groups(index)


def _score_layer(adapter: ModelAdapter, index: int, gqa_mode: str,
                 element: ElementScores) -> tuple[torch.Tensor, torch.Tensor]:
    heads, channels = _layer_groups(adapter, index, gqa_mode)
    return group_scores(heads, element), group_scores(channels, element)


def taylor_scores(context: PruneContext, layers: list[int], gqa_mode: str,
                  progress: bool = True) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """|w * dL/dw| with the LM loss's gradient accumulated over the calibration windows.

    Only the pruned layers' projection weights keep gradients (not embeddings or norms),
    which bounds the gradient memory to those matrices.
    """
    model, adapter = context.model, context.adapter
    was_training = model.training
    flags = {id(p): p.requires_grad for p in model.parameters()}
    projections = {i: adapter.linears(adapter.layers[i]) for i in layers}
    weights = [p.module.weight for projs in projections.values() for p in projs.values()]
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
        w.grad = None
    model.eval()  # no dropout: the gradient of the deployed function
    try:
        n = len(context.calibration)
        bar = tqdm(context.calibration, desc="taylor gradients", disable=not progress)
        for ids in bar:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss / n
            loss.backward()
            bar.set_postfix(loss=f"{loss.item() * n:.3f}")
        out = {}
        for i, projs in projections.items():
            element = {name: _taylor_element(p) for name, p in projs.items()}
            out[i] = _score_layer(adapter, i, gqa_mode, element)
    finally:
        for p in model.parameters():
            p.grad = None
            p.requires_grad_(flags[id(p)])
        model.train(was_training)
    return out


def _taylor_element(proj: Projection) -> torch.Tensor:
    grad = proj.module.weight.grad
    if grad is None:
        raise SecateurError(f"no gradient reached {proj.name}: taylor importance needs a "
                            "model whose forward uses every projection")
    if proj.transposed:
        grad = grad.t()
    return (proj.weight * grad).abs()


def l2_scores(context: PruneContext, layers: list[int], gqa_mode: str,
              progress: bool = True) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    adapter = context.adapter
    out = {}
    for i in layers:
        projs = adapter.linears(adapter.layers[i])
        out[i] = _score_layer(adapter, i, gqa_mode,
                              {name: p.weight.float() ** 2 for name, p in projs.items()})
    return out


def activation_scores(context: PruneContext, layers: list[int], gqa_mode: str,
                      progress: bool = True) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Wanda-sp: |W_ij| * ||X_j|| from one dense pass of the calibration windows."""
    if context.layerwise_stats is None:
        raise SecateurError("activation importance needs calibration statistics")
    adapter = context.adapter
    wanted = set(layers)
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def on_layer(index: int, projections: dict[str, Projection], stats: Any) -> None:
        if index not in wanted:
            return
        element = {name: p.weight.abs() * stats[name][ColumnSquares.name].norms.unsqueeze(0)
                   for name, p in projections.items()}
        out[index] = _score_layer(adapter, index, gqa_mode, element)

    context.layerwise_stats((ColumnSquares,), on_layer)
    return out


def random_scores(context: PruneContext, layers: list[int], gqa_mode: str,
                  progress: bool = True) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(context.seed)
    out = {}
    for i in layers:
        heads, channels = _layer_groups(context.adapter, i, gqa_mode)
        out[i] = (torch.rand(heads.size, generator=gen, dtype=torch.float64),
                  torch.rand(channels.size, generator=gen, dtype=torch.float64))
    return out


SCORERS = {"taylor": taylor_scores, "l2": l2_scores, "activation": activation_scores,
           "random": random_scores}


# -- allocation -----------------------------------------------------------------------------
@dataclass
class Stack:
    """One layer's heads or channels as removal units, least important first.

    A unit is one group, except in 'query' mode where it is one query head from every KV
    group (so removal stays even per KV group).
    """

    layer: int
    kind: str  # "heads" or "channels"
    units: list[torch.Tensor]  # group indices per unit
    scores: torch.Tensor  # per unit, ascending
    cost: int  # parameters per unit
    limit: int  # most units that may go (the rest keeps the layer working)


def head_stack(layer: int, groups: GroupSet, scores: torch.Tensor) -> Stack:
    cost = groups.parameters_per_group()
    if groups.kind == "query-heads":
        kv = int(groups.kv_of.max()) + 1
        per_kv = [torch.nonzero(groups.kv_of == g).squeeze(1) for g in range(kv)]
        ranked = [members[torch.argsort(scores[members], stable=True)] for members in per_kv]
        units = [torch.stack([r[j] for r in ranked]) for j in range(len(ranked[0]))]
        unit_scores = torch.stack([scores[u].sum() for u in units])
        order = torch.argsort(unit_scores, stable=True)  # sums of sorted rows are sorted
        return Stack(layer, "heads", [units[k] for k in order], unit_scores[order], cost * kv,
                     len(units) - 1)
    order = torch.argsort(scores, stable=True)
    return Stack(layer, "heads", [o.reshape(1) for o in order], scores[order], cost,
                 groups.size - 1)


def channel_stack(layer: int, groups: GroupSet, scores: torch.Tensor) -> Stack:
    order = torch.argsort(scores, stable=True)
    return Stack(layer, "channels", [o.reshape(1) for o in order], scores[order],
                 groups.parameters_per_group(), groups.size - 1)


def allocate_uniform(stacks: dict[tuple[int, str], Stack], share: float) -> dict[tuple, int]:
    """Each layer loses `share` of its heads (rounded to units) and makes up the rest of
    `share` of its parameters in channels, as LLM-Pruner's per-layer ratio does."""
    counts: dict[tuple, int] = {}
    for layer in sorted({k[0] for k in stacks}):
        h, c = stacks[(layer, "heads")], stacks[(layer, "channels")]
        n_heads = round(share * len(h.units))
        if n_heads > h.limit:
            raise SecateurError(f"--ratio removes {share:.0%} of layer {layer}, which would "
                                f"remove every attention head: lower --ratio or protect fewer "
                                "layers")
        budget = share * (h.cost * len(h.units) + c.cost * len(c.units)) - n_heads * h.cost
        n_channels = max(0, round(budget / c.cost))
        if n_channels > c.limit:
            raise SecateurError(f"--ratio removes {share:.0%} of layer {layer}, which would "
                                "remove every MLP channel: lower --ratio or protect fewer layers")
        counts[(layer, "heads")], counts[(layer, "channels")] = n_heads, n_channels
    return counts


def allocate_by_importance(stacks: dict[tuple[int, str], Stack], target: float,
                           min_keep: float = 0.1) -> dict[tuple, int]:
    """Remove the globally least important units per parameter until `target` parameters go.

    Heads and channels are put on one scale by dividing each kind's per-parameter scores by
    that kind's median over all pruned layers. Each layer keeps at least `min_keep` of its
    heads and channels (and one unit), so no layer collapses.
    """
    entries = []
    for key, s in stacks.items():
        entries.append((key, s.scores / s.cost))
    medians = {}
    for kind in ("heads", "channels"):
        values = torch.cat([v for k, v in entries if k[1] == kind])
        medians[kind] = float(values.median()) or 1.0
    keys, positions, values = [], [], []
    for key, per_param in entries:
        s = stacks[key]
        cap = min(s.limit, int(len(s.units) * (1 - min_keep)))
        keys += [key] * cap
        positions += list(range(cap))
        values.append(per_param[:cap] / medians[key[1]])
    order = torch.argsort(torch.cat(values), stable=True).tolist()
    counts = {key: 0 for key in stacks}
    removed = 0.0
    for k in order:
        key = keys[k]
        if positions[k] != counts[key]:  # units leave a stack in order; ties are skipped
            continue
        cost = stacks[key].cost
        if removed + cost / 2 > target:
            break
        counts[key] += 1
        removed += cost
    if removed + max(s.cost for s in stacks.values()) < target:
        raise SecateurError(f"cannot remove {target:,.0f} parameters while keeping every "
                            "layer working: lower --ratio or protect fewer layers")
    return counts


def round_channels(counts: dict[tuple, int], sizes: dict[tuple[int, str], int],
                   layers: list[int], multiple: int) -> None:
    """Move each layer's channel count so that the MLP width it keeps is the nearest multiple
    of `multiple` (at least one multiple, at most the layer's width): a width a runtime's
    blocks divide. The removed share moves by at most half a multiple per layer."""
    for i in layers:
        key = (i, "channels")
        size = sizes[key]
        # the widest multiple the layer holds (a layer narrower than one multiple stays whole)
        most = size // multiple * multiple or size
        nearest = round((size - counts[key]) / multiple) * multiple
        counts[key] = size - min(max(multiple, nearest), most)


def decoder_parameters(adapter: ModelAdapter) -> int:
    seen: set[int] = set()
    total = 0
    for p in adapter.layers.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def _mask(size: int, units: list[torch.Tensor]) -> torch.Tensor:
    mask = torch.zeros(size, dtype=torch.bool)
    if units:
        mask[torch.cat(units)] = True
    return mask


@register_method(LLMPrunerConfig)
class LLMPruner(ModelMethod):
    config: LLMPrunerConfig

    def run(self, context: PruneContext) -> dict[str, Any]:
        cfg, adapter, model = self.config, context.adapter, context.model
        if not adapter.width_surgery:
            raise SecateurError(f"llm-pruner has no group rules for "
                                f"'{model.config.model_type}'")
        # per-layer widths save as secateur's generic class (surgery/flex.py), any family
        n = adapter.num_layers
        first, last = cfg.protected(n)
        layers = list(range(first, n - last))
        if not layers:
            raise SecateurError(f"protecting {first} first and {last} last layers leaves none "
                                f"of {n} to prune")
        full = (*adapter.attn_in, adapter.attn_out, *adapter.mlp_in, adapter.mlp_out)
        for i in layers:
            if len(adapter.linears(adapter.layers[i])) < len(full):
                # its head/channel groups would be empty; the allocation assumes none are
                raise SecateurError(f"layer {i} lost its attention or MLP block to an earlier "
                                    "depth step: run llm-pruner before blockpruner, or protect "
                                    "that layer")
        dense = decoder_parameters(adapter)
        target = cfg.ratio * dense

        start = time.perf_counter()
        scores = SCORERS[cfg.importance](context, layers, cfg.gqa_mode)
        importance_seconds = time.perf_counter() - start
        # Linux reports KiB; taylor's gradients are the memory peak of this method
        importance_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

        stacks: dict[tuple[int, str], Stack] = {}
        sizes: dict[tuple[int, str], int] = {}
        for i in layers:
            heads, channels = _layer_groups(adapter, i, cfg.gqa_mode)
            stacks[(i, "heads")] = head_stack(i, heads, scores[i][0])
            stacks[(i, "channels")] = channel_stack(i, channels, scores[i][1])
            sizes[(i, "heads")], sizes[(i, "channels")] = heads.size, channels.size
        prunable = sum(len(s.units) * s.cost for s in stacks.values())
        if target >= prunable:
            raise SecateurError(f"--ratio {cfg.ratio} asks for {target:,.0f} parameters but the "
                                f"{len(layers)} unprotected layers' heads and channels hold "
                                f"{prunable:,}: this would remove every head; lower --ratio or "
                                "protect fewer layers")
        if cfg.allocation == "uniform":
            counts = allocate_uniform(stacks, target / prunable)
        else:
            counts = allocate_by_importance(stacks, target)

        if cfg.multiple_of > 1:
            round_channels(counts, sizes, layers, cfg.multiple_of)
        widths = {}
        for i in layers:
            hk, ck = (i, "heads"), (i, "channels")
            remove_heads = _mask(sizes[hk], stacks[hk].units[:counts[hk]])
            remove_channels = _mask(sizes[ck], stacks[ck].units[:counts[ck]])
            widths[i] = shrink_layer(adapter, i, remove_heads, remove_channels, cfg.gqa_mode)
        saved_as = rewrite_config(model, adapter)
        after = decoder_parameters(adapter)
        shape = {i: (w.num_heads, w.num_kv_heads, w.intermediate_size) for i, w in widths.items()}
        return {
            "importance": cfg.importance,
            "allocation": cfg.allocation,
            "gqa_mode": cfg.gqa_mode,
            "ratio": cfg.ratio,
            "multiple_of": cfg.multiple_of,
            "protected_layers": {"first": first, "last": last},
            "decoder_parameters": {"dense": dense, "pruned": after},
            "removed_share": 1 - after / dense,
            "importance_seconds": importance_seconds,
            "peak_rss_mib_after_importance": importance_rss,
            "config": saved_as,
            "layer_widths": [
                {"layer": i, "num_heads": s[0], "num_kv_heads": s[1], "intermediate_size": s[2]}
                for i, s in sorted(shape.items())
            ],
        }
