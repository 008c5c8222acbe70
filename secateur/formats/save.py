"""Which format an output is saved in, and the save itself: one rule for every command and
recipe (`secateur.recipe`'s runner and `secateur.jobs`' layouts call it, nothing else decides).

`output_format` picks the format from the model and what was asked for (llama.cpp's block
types as GGUF, quantized linears as compressed-tensors, a bitmask input kept a bitmask, else
safetensors) and refuses one that cannot hold the model; `save_output` writes it through the
writer in this package that owns that layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch

from secateur.errors import SecateurError
from secateur.formats.hf import save_model
from secateur.models.loading import Loaded

# what a recipe's save_format (and each command's default) may ask for
SaveFormat = Literal["auto", "safetensors", "compressed-tensors", "bitmask", "gguf"]


def output_format(model: torch.nn.Module, requested: SaveFormat = "auto",
                  like: str | Path | None = None) -> str:
    """What an output is saved as, for every command and recipe: llama.cpp's block types as
    GGUF, quantized linears pack-quantized (compressed-tensors), else what was asked for;
    `auto` keeps a bitmask (compact) input `like` compact and writes anything else as
    safetensors. A format that cannot hold the model is refused."""
    from secateur.formats.compact import is_compact
    from secateur.quant.ggml import ggml_states
    from secateur.quant.state import is_quantized

    if ggml_states(model):
        if requested not in ("auto", "gguf"):
            raise SecateurError(f"save_format {requested} cannot hold llama.cpp's block types: "
                                "use gguf (or auto)")
        return "gguf"
    if requested == "gguf":
        raise SecateurError("save_format gguf needs a gguf step (method: gguf, preset: ...)")
    quantized = is_quantized(model)
    if requested == "auto":
        if quantized:
            return "compressed-tensors"
        compact = like is not None and Path(like).is_dir() and is_compact(Path(like))
        return "bitmask" if compact else "safetensors"
    if quantized and requested != "compressed-tensors":
        raise SecateurError(f"save_format {requested} cannot hold quantized weights: use "
                            "compressed-tensors (or auto)")
    if requested == "compressed-tensors" and not quantized:
        raise SecateurError("save_format compressed-tensors needs a quantization step; use "
                            "auto or safetensors")
    return requested


def save_output(loaded: Loaded, fmt: str, target: Path, metadata: dict[str, Any],
                overwrite: bool = False, *, nm: str | None = None,
                gguf_preset: str | None = None, name: str = "model",
                inputs: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """Write `loaded` in `fmt` (from `output_format`) to `target`, a folder, or for gguf the
    .gguf file itself; a GGUF's export record is returned. `nm`: a bitmask's N:M pattern."""
    if fmt == "gguf":  # llama.cpp's block types, the codes as the step rounded them
        from secateur.formats.export import export_model
        from secateur.quant.ggml import ggml_states

        return export_model(loaded.model, loaded.tokenizer, "gguf", target, overwrite,
                            gguf_preset, name, inputs, quantized=ggml_states(loaded.model),
                            has_imatrix=True)
    if fmt == "compressed-tensors":  # pack-quantized, as vLLM and transformers load it
        from secateur.formats.packed_save import save_packed

        save_packed(loaded.model, loaded.tokenizer, target, metadata, overwrite)
    elif fmt == "bitmask":
        from secateur.formats.compact import save_compact

        save_compact(loaded.model, loaded.tokenizer, target, metadata, overwrite, nm=nm)
    else:
        save_model(loaded.model, loaded.tokenizer, target, metadata, overwrite)
    return None
