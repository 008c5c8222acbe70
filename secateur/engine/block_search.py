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

# token rows per lm_head chunk: small enough that the logits are reused heap memory rather than
# a fresh mmap per chunk (with 1024 rows, page faults were ~40% of the head's CPU time)
HEAD_ROWS = 256


@dataclass
class SearchCost:
    candidates: int = 0  # candidate removals scored (screening and final scoring both count)
    layer_forwards: float = 0.0  # decoder-layer calls, in passes over every calibration window
    head_forwards: float = 0.0  # final norm + lm_head + loss, in the same unit
    naive_passes: int = 0  # full-model passes the plain search (one per candidate) would run
    seconds: float = 0.0

    def to_dict(self, num_layers: int) -> dict[str, float]:
        return {"candidates": self.candidates, "layer_forwards": round(self.layer_forwards, 2),
                "head_forwards": round(self.head_forwards, 2),
                # what the same work would be in whole-model passes over the calibration set
                "forward_pass_equivalents": round(self.layer_forwards / num_layers, 2),
                "naive_forward_passes": self.naive_passes, "seconds": round(self.seconds, 2)}


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
        self.tokens = self._tokens(range(len(self.targets)))
        self.windows = len(windows)
        self.removed: list[Block] = []
        # candidates the last score() only screened, with their screening-window NLL
        self.screening: dict[Block, float] = {}
        self.cost = SearchCost(seconds=time.perf_counter() - start)

    @property
    def num_layers(self) -> int:
        return len(self.calls)

    def _tokens(self, batches: Sequence[int]) -> int:
        """Scored (next-token) positions in `batches`."""
        return sum(self.targets[b].numel() for b in batches)

    def _share(self, hidden: list[torch.Tensor]) -> float:
        """The share of all calibration windows in `hidden` (cost counts whole passes)."""
        return sum(h.shape[0] for h in hidden) / self.windows

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
        self.cost.layer_forwards += self._share(hidden)
        return out

    @torch.no_grad()
    def _head_nll(self, hidden: list[torch.Tensor], batches: Sequence[int]) -> float:
        """Summed next-token NLL of `batches` (indices into the calibration batches)."""
        total = 0.0
        for h, b in zip(hidden, batches, strict=True):
            states = h[:, :-1].reshape(-1, h.shape[-1])
            target = self.targets[b].reshape(-1)
            # rows in chunks: logits over a large vocabulary are big; the softmax runs in fp32
            # whatever the search dtype, so bf16 only touches the matmuls
            for i in range(0, states.shape[0], HEAD_ROWS):
                logits = self.adapter.logits_from_hidden(states[i:i + HEAD_ROWS]).float()
                total += F.cross_entropy(logits, target[i:i + HEAD_ROWS],
                                         reduction="sum").item()
        self.cost.head_forwards += self._share(hidden)
        return total

    def _walk_to_loss(self, start: int, hidden: list[torch.Tensor], extra: Block | None,
                      batches: Sequence[int]) -> float:
        for i in range(start, self.num_layers):
            hidden = self._layer(i, hidden, self._parts(extra, i))
        return self._head_nll(hidden, batches)

    # -- what methods call ---------------------------------------------------------------
    def loss(self) -> float:
        """Mean next-token NLL of the current model (with `removed` applied)."""
        t = time.perf_counter()
        every = range(len(self.inputs))
        value = self._walk_to_loss(0, self.inputs, None, every) / self.tokens
        self.cost.seconds += time.perf_counter() - t
        return value

    def remove(self, block: Block) -> None:
        if block in self.removed:
            raise ValueError(f"block {block} is already removed")
        self.removed.append(block)

    def score(self, candidates: Sequence[Block], desc: str = "candidates",
              shortlist: int | None = None,
              rank: Callable[[Block, float], float] | None = None) -> dict[Block, float]:
        """Mean NLL with each candidate removed on top of `removed`.

        Exact by default: every candidate on every window. With `shortlist=K` (and more than
        one batch of windows) every candidate is first screened on the first quarter of the
        batches, and only the K best screened are scored on all windows. Only scores over
        every window are returned (so a caller's min is over the finalists: a screening
        score is on other text and not comparable); the screening scores of the others are
        in `screening`. "Best" is the lowest NLL, or with `rank` the lowest
        `rank(candidate, NLL increase over the current model on the screening windows)`, so
        the screening keeps the finalists of the caller's own criterion.
        """
        t = time.perf_counter()
        batches = list(range(len(self.inputs)))
        self.screening = {}
        self.cost.naive_passes += len(candidates)
        if shortlist is None or len(batches) < 2 or shortlist >= len(candidates):
            sums = self._scan(candidates, batches, desc)
            scores = {c: v / self.tokens for c, v in sums.items()}
        else:
            screen = batches[:max(1, len(batches) // 4)]
            rest = batches[len(screen):]
            first = self._scan(candidates, screen, f"{desc} (screen)")
            if rank is None:
                ranked = sorted(candidates, key=lambda c: (first[c], -c.layer, c.part))
            else:
                now = self._walk_to_loss(0, [self.inputs[b] for b in screen], None, screen)
                per_token = self._tokens(screen)
                keys = {c: rank(c, (first[c] - now) / per_token) for c in candidates}
                ranked = sorted(candidates, key=lambda c: (keys[c], -c.layer, c.part))
            finalists = ranked[:shortlist]
            second = self._scan(finalists, rest, f"{desc} (top {shortlist})")
            scores = {c: (first[c] + second[c]) / self.tokens for c in finalists}
            screen_tokens = self._tokens(screen)
            self.screening = {c: first[c] / screen_tokens for c in ranked[shortlist:]}
        self.cost.seconds += time.perf_counter() - t
        return scores

    def _scan(self, candidates: Sequence[Block], batches: Sequence[int],
              desc: str) -> dict[Block, float]:
        """Summed NLL over `batches` per candidate; one shared walk through the layers."""
        by_layer: dict[int, list[Block]] = {}
        for c in candidates:
            by_layer.setdefault(c.layer, []).append(c)
        sums: dict[Block, float] = {}
        best: tuple[float, Block] | None = None
        hidden = [self.inputs[b] for b in batches]
        tokens = self._tokens(batches)
        last = max(by_layer, default=-1)
        bar = tqdm(total=len(candidates), desc=desc, disable=not self.progress, leave=False)
        for i in range(last + 1):
            for c in by_layer.get(i, []):
                sums[c] = self._walk_to_loss(i, hidden, c, batches)
                self.cost.candidates += 1
                if best is None or sums[c] < best[0]:
                    best = (sums[c], c)
                bar.update(1)
                bar.set_postfix(best=str(best[1]), ppl=f"{math.exp(best[0] / tokens):.2f}")
            if i < last:
                hidden = self._layer(i, hidden, self._parts(None, i))
        bar.close()
        return sums

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
                "windows": self.windows, "tokens_scored": self.tokens,
                "dtype": str(self.dtype).removeprefix("torch.")}
