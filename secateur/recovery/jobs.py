"""What the recovery jobs share: evaluation, saving like the input, the model a step trains."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from secateur.methods.base import PruneContext
from secateur.models.loading import Loaded


def evaluation_perplexity(loaded: Loaded, evaluation: Any, source: Any,
                          progress: bool) -> dict[str, Any]:
    """Perplexity under a `secateur.jobs.EvalSpec` of a text already loaded."""
    from secateur.eval.perplexity import perplexity

    return perplexity(loaded.model, loaded.tokenizer, source, evaluation.seqlen,
                      evaluation.max_windows, evaluation.protocol, evaluation.bos,
                      progress).to_dict()


def save_like_input(loaded: Loaded, model_dir: str, out: Path, result: dict[str, Any],
                    overwrite: bool) -> None:
    """A compact (bitmask) input is saved compact again, anything else as safetensors."""
    from secateur.surgery.compact import is_compact, save_compact
    from secateur.surgery.save import save_model

    source = Path(model_dir)
    if source.is_dir() and is_compact(source):
        save_compact(loaded.model, loaded.tokenizer, out, result, overwrite)
    else:
        save_model(loaded.model, loaded.tokenizer, out, result, overwrite)


def recovery_loaded(context: PruneContext) -> Loaded:
    """The model a recovery step trains: the API's Loaded, or one built from the context."""
    if context.loaded is not None:
        return context.loaded
    return Loaded(context.model, context.tokenizer, context.adapter, "", "")
