"""Cheap candidate evaluation for depth pruning (BlockPruner, SLEB, ShortGPT's curve).

Scoring a candidate removal means the calibration loss of the model without it. Layers before
the candidate compute the same hidden states for every candidate at that layer, so the search
walks the layers once: it keeps the current model's input to layer i (for all calibration
windows, batched), scores every candidate at layer i from there (layers i..L-1, then the head),
and only then advances the cache through layer i. A candidate at layer i costs L - i layer
forwards instead of L, about half on average; windows run in batches.

Candidates are applied at run time (a skipped layer is not called; a removed branch is swapped
for a weightless stand-in for that one call), so the model is never modified by the search.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from secateur.engine.capture import LayerCall, call_layer, capture_layer_inputs
from secateur.models.base import ModelAdapter
from secateur.surgery.depth import Block, restore_branch, swap_branch


@dataclass
class SearchCost:
    candidates: int = 0  # candidate removals scored
    layer_forwards: int = 0  # decoder-layer calls, each over every calibration window
    head_forwards: int = 0  # final norm + lm_head + loss over every calibration window
    seconds: float = 0.0

    def to_dict(self, num_layers: int) -> dict[str, float]:
        return {"candidates": self.candidates, "layer_forwards": self.layer_forwards,
                "head_forwards": self.head_forwards,
                # what the same work would be in whole-model passes over the calibration set
                "forward_pass_equivalents": round(self.layer_forwards / num_layers, 2),
                "naive_forward_passes": self.candidates, "seconds": round(self.seconds, 2)}


class BlockSearch:
    """Calibration loss of the current model with extra blocks removed, computed cheaply."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, windows: list[torch.Tensor],
                 batch_size: int = 8, progress: bool = True,
                 dtype: torch.dtype | None = None) -> None:
        if not windows:
            raise ValueError("the block search needs at least one calibration window")
        self.dtype = dtype or next(model.parameters()).dtype
        if self.dtype != next(model.parameters()).dtype:
            # A private copy in the search dtype: bf16 matmuls run ~3.5x faster than fp32 on
            # CPU (oneDNN), and BlockPruner's reference searches in bf16 too.
            model = copy.deepcopy(model).to(self.dtype)
            adapter = type(adapter)(model)
        self.model, self.adapter, self.progress = model, adapter, progress
        start = time.perf_counter()
        captured = capture_layer_inputs(model, adapter, windows)
        self.calls: list[LayerCall] = captured.calls
        self.inputs = [torch.cat(captured.hidden[i:i + batch_size])
                       for i in range(0, len(windows), batch_size)]
        self.targets = [torch.cat(windows[i:i + batch_size])[:, 1:]
                        for i in range(0, len(windows), batch_size)]
        self.tokens = sum(t.numel() for t in self.targets)
        self.removed: list[Block] = []
        self.cost = SearchCost(seconds=time.perf_counter() - start)

    @property
    def num_layers(self) -> int:
        return len(self.calls)

    # -- running layers with a set of removals ---------------------------------------------
    def _parts(self, extra: Block | None, index: int) -> set[str]:
        blocks = [*self.removed, *([extra] if extra else [])]
        return {b.part for b in blocks if b.layer == index}

    @torch.no_grad()
    def _layer(self, index: int, hidden: list[torch.Tensor], parts: set[str]
               ) -> list[torch.Tensor]:
        if "layer" in parts or {"attn", "mlp"} <= parts:
            return hidden
        layer = self.adapter.layers[index]
        saved = [s for part in parts for s in swap_branch(self.adapter, layer, part)]
        try:
            out = [call_layer(layer, h, self.calls[index]) for h in hidden]
        finally:
            restore_branch(layer, saved)
        self.cost.layer_forwards += 1
        return out

    @torch.no_grad()
    def _head_loss(self, hidden: list[torch.Tensor]) -> float:
        total = 0.0
        for h, target in zip(hidden, self.targets, strict=True):
            # one window at a time: a batch of logits over a large vocabulary is big
            for row in range(h.shape[0]):
                logits = self.adapter.logits_from_hidden(h[row:row + 1, :-1]).float()
                total += F.cross_entropy(logits[0], target[row], reduction="sum").item()
        self.cost.head_forwards += 1
        return total / self.tokens

    def _finish(self, start: int, hidden: list[torch.Tensor], extra: Block | None) -> float:
        for i in range(start, self.num_layers):
            hidden = self._layer(i, hidden, self._parts(extra, i))
        return self._head_loss(hidden)

    # -- what methods call ---------------------------------------------------------------
    def loss(self) -> float:
        """Mean next-token NLL of the current model (with `removed` applied)."""
        t = time.perf_counter()
        value = self._finish(0, self.inputs, None)
        self.cost.seconds += time.perf_counter() - t
        return value

    def remove(self, block: Block) -> None:
        if block in self.removed:
            raise ValueError(f"block {block} is already removed")
        self.removed.append(block)

    def score(self, candidates: Sequence[Block], desc: str = "candidates") -> dict[Block, float]:
        """Mean NLL with each candidate removed on top of `removed`; one shared layer walk."""
        t = time.perf_counter()
        by_layer: dict[int, list[Block]] = {}
        for c in candidates:
            by_layer.setdefault(c.layer, []).append(c)
        scores: dict[Block, float] = {}
        best: tuple[float, Block] | None = None
        hidden = self.inputs
        last = max(by_layer, default=-1)
        bar = tqdm(total=len(candidates), desc=desc, disable=not self.progress, leave=False)
        for i in range(last + 1):
            for c in by_layer.get(i, []):
                scores[c] = self._finish(i, hidden, c)
                self.cost.candidates += 1
                if best is None or scores[c] < best[0]:
                    best = (scores[c], c)
                bar.update(1)
                bar.set_postfix(best=str(best[1]), ppl=f"{math.exp(best[0]):.2f}")
            if i < last:
                hidden = self._layer(i, hidden, self._parts(None, i))
        bar.close()
        self.cost.seconds += time.perf_counter() - t
        return scores

    @torch.no_grad()
    def trace(self, on_layer: Callable[[int, torch.Tensor, torch.Tensor], None]) -> None:
        """Call `on_layer(index, input, output)` per layer and batch of the current model."""
        t = time.perf_counter()
        hidden = self.inputs
        for i in tqdm(range(self.num_layers), desc="layer inputs/outputs",
                      disable=not self.progress, leave=False):
            out = self._layer(i, hidden, self._parts(None, i))
            for x, y in zip(hidden, out, strict=True):
                on_layer(i, x, y)
            hidden = out
        self.cost.seconds += time.perf_counter() - t

    def summary(self) -> dict[str, float]:
        return {**self.cost.to_dict(self.num_layers),
                "windows": sum(x.shape[0] for x in self.inputs), "tokens_scored": self.tokens,
                "dtype": str(self.dtype).removeprefix("torch.")}
