"""Perplexity as the pruning papers measure it, with the protocol recorded next to the number."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from secateur.data.sources import TextSource
from secateur.data.windows import eval_windows, tokenize_stream
from secateur.errors import SecateurError
from secateur.eval.protocol import PROTOCOLS, PerplexityProtocol, library_versions


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token
    tokens: int
    protocol: PerplexityProtocol

    def to_dict(self) -> dict:
        return {"perplexity": self.perplexity, "nll": self.nll, "tokens": self.tokens,
                "protocol": self.protocol.to_dict()}


def context_length(model: nn.Module) -> int | None:
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def resolve_seqlen(model: nn.Module, seqlen: int | None, protocol: str) -> int:
    if protocol not in PROTOCOLS:
        raise SecateurError(f"unknown protocol '{protocol}': use one of {', '.join(PROTOCOLS)}")
    if seqlen is not None and seqlen < 2:
        raise SecateurError(f"--seqlen must be at least 2 tokens, got {seqlen}")
    wanted = seqlen if seqlen is not None else PROTOCOLS[protocol]
    ctx = context_length(model)
    return min(wanted, ctx) if ctx else wanted


def resolve_bos(model: nn.Module, bos: str) -> str:
    """`auto`: BOS on every window for Gemma (its perplexity triples without it: 15.2 vs 49.7
    on wiki at 256 tokens), else the SparseGPT/Wanda stream as the tokenizer makes it."""
    if bos != "auto":
        return bos
    model_type = getattr(model.config, "model_type", "") or ""
    return "each" if model_type.startswith("gemma") else "default"


def _bos_each(tokenizer) -> int:
    if tokenizer.bos_token_id is None:
        raise SecateurError("--bos each needs a tokenizer with a BOS token; this one has none")
    return tokenizer.bos_token_id


@torch.no_grad()
def window_nll(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of one (1, seqlen) window: seqlen - 1 tokens scored."""
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
    return F.cross_entropy(logits, ids[0, 1:], reduction="sum")


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer,
    source: TextSource,
    seqlen: int | None = None,
    max_windows: int | None = None,
    protocol: str = "sparsegpt",
    bos: str = "auto",
    progress: bool = True,
) -> PerplexityResult:
    """exp(mean next-token NLL) over non-overlapping windows of the joined text.

    Each window is scored on its seqlen-1 next-token predictions; the mean runs over every
    scored token (equal to the SparseGPT/Wanda mean of per-window losses, since all windows
    have the same length).
    """
    if max_windows is not None and max_windows < 1:
        raise SecateurError(f"--max-windows must be at least 1, got {max_windows}")
    seqlen = resolve_seqlen(model, seqlen, protocol)
    bos = resolve_bos(model, bos)
    ids = tokenize_stream(tokenizer, source.joined(), bos)
    bos_id = _bos_each(tokenizer) if bos == "each" else None
    windows = eval_windows(ids, seqlen, max_windows, bos_id)
    total = torch.zeros((), dtype=torch.float64)
    for window in tqdm(windows.windows, desc=f"perplexity {source.name}", disable=not progress,
                       leave=False):
        total += window_nll(model, window).double()
    tokens = len(windows.windows) * (seqlen - 1)
    nll = (total / tokens).item()
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    proto = PerplexityProtocol(
        name=protocol, dataset=source.name, origin=source.origin, split=source.split,
        join=source.join, seqlen=seqlen, stride=windows.stride, windows=len(windows.windows),
        windows_available=windows.available, tokens_scored=tokens, bos=bos, dtype=dtype,
        versions=library_versions(),
    )
    return PerplexityResult(math.exp(nll), nll, tokens, proto)
