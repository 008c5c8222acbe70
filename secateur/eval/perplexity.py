"""Perplexity as the pruning papers measure it, with the protocol recorded next to the number."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from secateur.data.sources import TextSource
from secateur.data.windows import eval_windows, tokenize_stream
from secateur.device import on_device
from secateur.errors import SecateurError
from secateur.eval.protocol import PROTOCOLS, PerplexityProtocol, library_versions
from secateur.models.base import ModelAdapter, adapter_for, get_submodule

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_BATCH_SIZE = 8
# positions per head chunk: 256 x 262k-vocab fp32 logits are 268 MB, and chunks this small
# reuse heap memory instead of a fresh mmap each (see secateur.engine.block_search)
HEAD_ROWS = 256


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token
    tokens: int
    protocol: PerplexityProtocol

    def to_dict(self) -> dict:
        return {"perplexity": self.perplexity, "nll": self.nll, "tokens": self.tokens,
                "protocol": self.protocol.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> PerplexityResult:
        return cls(float(data["perplexity"]), float(data["nll"]), int(data["tokens"]),
                   PerplexityProtocol.from_dict(data["protocol"]))


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
    """`auto`: the family's policy (Gemma: BOS on every window), else the SparseGPT/Wanda
    stream as the tokenizer makes it."""
    if bos != "auto":
        return bos
    from secateur.models import adapter_for

    return adapter_for(model).bos_policy


def bos_each(tokenizer: Any) -> int:
    """The BOS id that starts every window under the 'each' BOS policy."""
    if tokenizer.bos_token_id is None:
        raise SecateurError("--bos each needs a tokenizer with a BOS token; this one has none")
    return tokenizer.bos_token_id


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_compute_dtype(model: nn.Module, compute_dtype: str | None) -> str:
    """The dtype the forward runs in: the weights' own unless `compute_dtype` says bfloat16."""
    weights = _dtype_name(next(model.parameters()).dtype)
    if compute_dtype is None:
        return weights
    if compute_dtype not in COMPUTE_DTYPES:
        raise SecateurError(f"unknown compute dtype '{compute_dtype}': use one of "
                            f"{', '.join(COMPUTE_DTYPES)}")
    if compute_dtype == "float32" and weights != "float32":
        raise SecateurError(f"the model is loaded in {weights}, so it cannot be evaluated in "
                            "float32: load it with dtype float32, or use compute dtype bfloat16")
    return compute_dtype


def compute_context(model: nn.Module, compute: str) -> Callable[[], AbstractContextManager]:
    """A fresh context per call that runs matmuls in `compute`.

    Autocast rather than a bf16 copy: no second copy of the weights, and norms, softmaxes and
    the residual stream stay fp32. The weight-cast cache is off, so bf16 copies of the weights
    do not outlive the call that made them (a 7B model would hold 14 GB of them).
    """
    param = next(model.parameters())
    if _dtype_name(param.dtype) == compute:
        return nullcontext
    return partial(torch.autocast, device_type=param.device.type,
                   dtype=COMPUTE_DTYPES[compute], cache_enabled=False)


def _final_hidden(model: nn.Module, adapter: ModelAdapter | None, ids: torch.Tensor
                  ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """The last decoder layer's output for every position and the head that maps it to logits.

    The model's own forward computes logits for the last position only (`logits_to_keep=1`);
    the caller applies the head in row chunks, so (batch x seqlen x vocab) logits never exist
    at once: 8 x 2048 x 262k fp32 would be 17 GB for Gemma 3.
    """
    norm = None if adapter is None else get_submodule(model, adapter.final_norm_path)
    if norm is None or "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return model(input_ids=ids, use_cache=False).logits, (lambda rows: rows)
    captured: list[torch.Tensor] = []

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append(args[0] if args else next(iter(kwargs.values())))

    handle = norm.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    return captured[-1], adapter.logits_from_hidden


@torch.no_grad()
def batch_nll(model: nn.Module, ids: torch.Tensor, adapter: ModelAdapter | None = None,
              compute: Callable[[], AbstractContextManager] = nullcontext) -> torch.Tensor:
    """Summed next-token NLL (float64) of a (batch, seqlen) block: batch x (seqlen-1) tokens.

    Log-softmax and NLL run in fp32 on chunks of HEAD_ROWS positions whatever the compute
    dtype; only the matmuls run in it.
    """
    with compute():
        hidden, head = _final_hidden(model, adapter, ids)
    states = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = ids[:, 1:].reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=ids.device)
    for i in range(0, states.shape[0], HEAD_ROWS):
        with compute():
            logits = head(states[i:i + HEAD_ROWS])
        total += F.cross_entropy(logits.float(), targets[i:i + HEAD_ROWS],
                                 reduction="sum").double()
    return total


def _adapter(model: nn.Module) -> ModelAdapter | None:
    try:
        return adapter_for(model)
    except SecateurError:  # an architecture secateur has no adapter for: full logits
        return None


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
    batch_size: int = DEFAULT_BATCH_SIZE,
    compute_dtype: str | None = None,
    device: torch.device | None = None,
) -> PerplexityResult:
    """exp(mean next-token NLL) over non-overlapping windows of the joined text.

    Each window is scored on its seqlen-1 next-token predictions; the mean runs over every
    scored token (equal to the SparseGPT/Wanda mean of per-window losses, since all windows
    have the same length). Windows run `batch_size` at a time (they all have the same length,
    so no padding; the number does not depend on it beyond float rounding). `compute_dtype`
    None runs in the weights' dtype; "bfloat16" runs an fp32 model's matmuls in bf16.
    `device`: the model runs there for the evaluation and goes back after (None: where it is).
    """
    with on_device(model, device):
        return _perplexity(model, tokenizer, source, seqlen, max_windows, protocol, bos,
                           progress, batch_size, compute_dtype)


def _perplexity(model: nn.Module, tokenizer, source: TextSource, seqlen: int | None,
                max_windows: int | None, protocol: str, bos: str, progress: bool,
                batch_size: int, compute_dtype: str | None) -> PerplexityResult:
    if max_windows is not None and max_windows < 1:
        raise SecateurError(f"--max-windows must be at least 1, got {max_windows}")
    if batch_size < 1:
        raise SecateurError(f"--batch-size must be at least 1, got {batch_size}")
    seqlen = resolve_seqlen(model, seqlen, protocol)
    bos = resolve_bos(model, bos)
    compute = resolve_compute_dtype(model, compute_dtype)
    context = compute_context(model, compute)
    adapter = _adapter(model)
    device = next(model.parameters()).device
    ids = tokenize_stream(tokenizer, source.joined(), bos)
    bos_id = bos_each(tokenizer) if bos == "each" else None
    windows = eval_windows(ids, seqlen, max_windows, bos_id)
    total = torch.zeros((), dtype=torch.float64)
    count = len(windows.windows)
    with tqdm(total=count, desc=f"perplexity {source.name}", unit="window",
              disable=not progress, leave=False) as bar:
        for i in range(0, count, batch_size):
            batch = torch.cat(windows.windows[i:i + batch_size]).to(device)
            total += batch_nll(model, batch, adapter, context).cpu()
            bar.update(batch.shape[0])
    tokens = count * (seqlen - 1)
    nll = (total / tokens).item()
    proto = PerplexityProtocol(
        name=protocol, dataset=source.name, origin=source.origin, split=source.split,
        join=source.join, seqlen=seqlen, stride=windows.stride, windows=count,
        windows_available=windows.available, tokens_scored=tokens, bos=bos,
        dtype=_dtype_name(next(model.parameters()).dtype), versions=library_versions(),
        compute_dtype=compute, device=str(device),
    )
    return PerplexityResult(math.exp(nll), nll, tokens, proto)
