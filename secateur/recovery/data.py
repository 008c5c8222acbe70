"""Training text as packed token windows, in a seeded order that needs no state to resume.

The text is tokenized once into one stream and cut into non-overlapping windows (sequence
packing: documents run into each other, nothing is padded); the last windows are held out for
evaluation. Micro-batch `s` of a run reads a fixed slice of a per-epoch permutation seeded by
`seed + epoch`, so a resumed run finds its place from the step number alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from secateur.data.sources import load_text
from secateur.data.windows import eval_windows, tokenize_stream
from secateur.errors import SecateurError
from secateur.eval.perplexity import context_length, resolve_bos


@dataclass
class TokenWindows:
    train: torch.Tensor  # (windows, seqlen) int64
    heldout: torch.Tensor  # (windows, seqlen), the end of the stream, never trained on
    seed: int
    record: dict[str, Any]

    def __post_init__(self) -> None:
        self._orders: dict[int, torch.Tensor] = {}

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            self._orders = {epoch: torch.randperm(len(self.train), generator=gen)}
        return self._orders[epoch]

    def indices(self, first: int, count: int) -> torch.Tensor:
        """Window indices of training samples first .. first + count - 1 (epochs repeat)."""
        n = len(self.train)
        return torch.stack([self._order(s // n)[s % n] for s in range(first, first + count)])

    def used(self, samples: int) -> torch.Tensor:
        """The distinct windows the first `samples` samples read, sorted."""
        if samples >= len(self.train):
            return torch.arange(len(self.train))
        return self.indices(0, samples).sort().values


def pack(model: torch.nn.Module, tokenizer: Any, data: str, seqlen: int, heldout: int,
         seed: int) -> TokenWindows:
    """Cut `data` into windows of `seqlen` tokens; fails if it cannot fill one training window
    plus `heldout` evaluation windows. BOS follows the model's evaluation policy (each window
    starts with BOS for Gemma, which degrades badly without it)."""
    context = context_length(model)
    if context is not None and seqlen > context:
        raise SecateurError(f"--seqlen {seqlen} is longer than the model's context of {context} "
                            "tokens: give at most that")
    source = load_text(data, split="train")
    bos = resolve_bos(model, "auto")
    ids = tokenize_stream(tokenizer, source.joined(), bos)
    bos_id = tokenizer.bos_token_id if bos == "each" else None
    windows = eval_windows(ids, seqlen, None, bos_id)
    if len(windows.windows) < heldout + 1:
        raise SecateurError(
            f"the text '{source.name}' has {ids.numel()} tokens, {len(windows.windows)} "
            f"window(s) of {seqlen}; training needs at least {heldout + 1} (one plus "
            f"{heldout} held out): give more text, or lower --seqlen or --heldout-windows")
    stacked = torch.cat(windows.windows)
    split = len(stacked) - heldout
    record = {"source": source.name, "origin": source.origin, "tokens": int(ids.numel()),
              "seqlen": seqlen, "bos": bos, "train_windows": split, "heldout_windows": heldout,
              "packing": "non-overlapping windows of the joined stream, remainder dropped; "
                         "held-out windows are the last ones"}
    return TokenWindows(stacked[:split], stacked[split:], seed, record)
