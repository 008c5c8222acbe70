"""Token windows: the evaluation windower and the seeded calibration sampler."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from secateur.data.sources import TextSource
from secateur.errors import SecateurError

BOS_POLICIES = ("auto", "default", "each", "none")


def tokenize_stream(tokenizer, text: str, bos: str = "default") -> torch.Tensor:
    """One long 1-D id stream. `default` lets the tokenizer add its special tokens once at the
    start, as the SparseGPT/Wanda scripts do; `each` and `none` leave them out here."""
    if bos not in BOS_POLICIES:
        raise SecateurError(f"unknown BOS policy '{bos}': use one of {', '.join(BOS_POLICIES)}")
    ids = tokenizer(text, add_special_tokens=(bos == "default"), return_tensors="pt").input_ids
    return ids[0]


@dataclass(frozen=True)
class SeqlenChoice:
    """The window length a run uses, and the one it was asked for when the model's context
    was shorter: the capping is recorded and announced, never silent."""

    used: int
    requested: int
    context: int | None  # the model's maximum positions, when its config says

    @property
    def capped(self) -> bool:
        return self.used < self.requested

    def warning(self, flag: str = "--seqlen") -> str | None:
        """The line to show the user when the length was capped, else None."""
        if not self.capped:
            return None
        return (f"{flag} {self.requested} is longer than the model's context ({self.context} "
                f"tokens): using {self.used}")

    def record(self) -> dict[str, int | bool | None]:
        return {"seqlen": self.used, "seqlen_requested": self.requested,
                "seqlen_capped_to_context": self.capped, "model_context": self.context}


def fit_seqlen(requested: int, context: int | None, flag: str = "--seqlen") -> SeqlenChoice:
    """The one place a window length meets the model's context: min(requested, context)."""
    if requested < 2:
        raise SecateurError(f"{flag} must be at least 2 tokens, got {requested}")
    used = min(requested, context) if context else requested
    return SeqlenChoice(used, requested, context)


@dataclass(frozen=True)
class EvalWindows:
    windows: list[torch.Tensor]  # each (1, seqlen)
    seqlen: int
    stride: int
    available: int  # how many whole windows the text holds


def eval_windows(
    ids: torch.Tensor,
    seqlen: int,
    max_windows: int | None = None,
    bos_id: int | None = None,
) -> EvalWindows:
    """Non-overlapping windows from the start of the stream, remainder dropped.

    With `bos_id`, each window is BOS followed by seqlen-1 text tokens (the `each` policy).
    """
    if seqlen < 2:
        raise SecateurError(f"seqlen must be at least 2 tokens, got {seqlen}")
    body = seqlen - 1 if bos_id is not None else seqlen
    available = ids.numel() // body
    if available == 0:
        raise SecateurError(f"the text has {ids.numel()} tokens, fewer than one window of "
                            f"{seqlen}: use a longer text or a smaller --seqlen")
    count = available if max_windows is None else min(available, max_windows)
    windows = []
    for i in range(count):
        chunk = ids[i * body : (i + 1) * body]
        if bos_id is not None:
            chunk = torch.cat([torch.tensor([bos_id]), chunk])
        windows.append(chunk.unsqueeze(0))
    return EvalWindows(windows, seqlen, seqlen, available)


def calibration_windows(
    tokenizer, source: TextSource, nsamples: int, seqlen: int, seed: int
) -> list[torch.Tensor]:
    """`nsamples` windows of `seqlen` tokens, as the SparseGPT/Wanda C4 loader draws them.

    Python's `random` seeded with `seed` picks a document longer than the window, then a
    start inside it; the same seed gives the same windows as the reference scripts. When no
    document is that long (short paragraphs), windows are drawn from the joined stream.
    """
    if nsamples < 1:
        raise SecateurError(f"--nsamples must be at least 1, got {nsamples}")
    if seqlen < 2:
        raise SecateurError(f"seqlen must be at least 2 tokens, got {seqlen}")
    rng = random.Random(seed)
    # Scan once (cheaply, by characters) so that the reference's rejection loop cannot spin
    # forever on a text whose documents are all short.
    long_enough = any(len(d) > seqlen for d in source.documents)
    windows: list[torch.Tensor] = []
    if long_enough:
        tries = 0
        while len(windows) < nsamples and tries < 1000 * nsamples:
            tries += 1
            doc = source.documents[rng.randint(0, len(source.documents) - 1)]
            ids = tokenizer(doc, return_tensors="pt").input_ids
            if ids.shape[1] <= seqlen:
                continue
            start = rng.randint(0, ids.shape[1] - seqlen - 1)
            windows.append(ids[:, start : start + seqlen])
        if len(windows) == nsamples:
            return windows
    stream = tokenize_stream(tokenizer, source.joined())
    if stream.numel() <= seqlen:
        raise SecateurError(
            f"calibration text '{source.name}' has {stream.numel()} tokens, not enough for one "
            f"window of {seqlen}: give more text or a smaller --seqlen"
        )
    while len(windows) < nsamples:
        start = rng.randint(0, stream.numel() - seqlen - 1)
        windows.append(stream[start : start + seqlen].unsqueeze(0))
    return windows
