"""`evaluate(loaded, config)`: one entry point for perplexity and zero-shot evaluation.

    secateur.evaluate(loaded, PerplexityConfig(data="wiki", seqlen=512, max_windows=64))
    secateur.evaluate(loaded, ZeroShotConfig(tasks=("arc_easy",), batch_size=8))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, overload

import torch
from torch import nn

from secateur.data.sources import TextSource, load_text
from secateur.device import resolve_device
from secateur.errors import SecateurError
from secateur.eval.config import PerplexityConfig, ZeroShotConfig
from secateur.eval.perplexity import PerplexityResult, perplexity
from secateur.eval.zeroshot import ZeroShotResult, zeroshot
from secateur.formats.loader import load
from secateur.models.loading import Loaded

EvalConfig = PerplexityConfig | ZeroShotConfig


def _model_and_tokenizer(model: Loaded | nn.Module | str | Path, tokenizer: Any
                         ) -> tuple[nn.Module, Any]:
    if isinstance(model, Loaded):
        return model.model, model.tokenizer
    if isinstance(model, str | Path):
        loaded = load(model)
        return loaded.model, loaded.tokenizer
    if isinstance(model, nn.Module):
        if tokenizer is None:
            raise SecateurError("evaluating a bare nn.Module needs its tokenizer: pass "
                                "tokenizer=..., or pass the Loaded that secateur.load returned")
        return model, tokenizer
    raise SecateurError(f"expected a loaded model, a model name or an nn.Module, got "
                        f"{type(model).__name__}")


@overload
def evaluate(model: Loaded | nn.Module | str | Path, config: PerplexityConfig,
             progress: bool = ..., *, tokenizer: Any = ..., source: TextSource | None = ...
             ) -> PerplexityResult: ...


@overload
def evaluate(model: Loaded | nn.Module | str | Path, config: ZeroShotConfig,
             progress: bool = ..., *, tokenizer: Any = ..., source: TextSource | None = ...
             ) -> ZeroShotResult: ...


def evaluate(model: Loaded | nn.Module | str | Path, config: EvalConfig, progress: bool = True,
             *, tokenizer: Any = None, source: TextSource | None = None,
             device: str | torch.device | None = "auto") -> PerplexityResult | ZeroShotResult:
    """Evaluate a model as `config` says; the model is not changed.

    `source`, for a perplexity, is the text already loaded (saves parsing `config.data` again
    when one text serves several evaluations). `device`: auto (CUDA if available), cpu, cuda,
    cuda:N, or None (where the model is); the model goes back where it was after."""
    if not isinstance(config, PerplexityConfig | ZeroShotConfig):
        raise SecateurError(f"evaluate takes a PerplexityConfig or a ZeroShotConfig, got "
                            f"{type(config).__name__}")
    dev = None if device is None else resolve_device(device)  # before the model loads
    m, tok = _model_and_tokenizer(model, tokenizer)
    if isinstance(config, PerplexityConfig):
        text = source if source is not None else load_text(config.data, split="test")
        return perplexity(m, tok, text, config.seqlen, config.max_windows, config.protocol,
                          config.bos, progress, batch_size=config.batch_size,
                          compute_dtype=config.compute_dtype, device=dev)
    return ZeroShotResult.from_dict(zeroshot(m, tok, config, device=dev))
