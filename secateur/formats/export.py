"""Exports to other runtimes' layouts: Nemotron-NAS (DeciLM, for vLLM) and GGUF (llama.cpp).

`export(model, fmt, out)` loads a model secateur can load (a saved pruned folder, a Hub name,
a built-in name), reads it as a Llama-shaped layout (`llama_layout.read_layout`: refuses anything
else in one line) and writes it; bad input is refused before anything is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from secateur.errors import SecateurError

FORMATS = ("nemotron-nas", "gguf")
DEFAULT_OUTTYPE = {"nemotron-nas": "f32", "gguf": "f16"}


def _check(fmt: str, outtype: str | None, out: Path, overwrite: bool,
           inputs: tuple[str, ...]) -> str:
    """Validate everything about the output before any model is read; returns the outtype."""
    from secateur.formats.gguf import OUTTYPES, check_gguf_output
    from secateur.formats.nemotron_nas import DTYPES
    from secateur.outputs import check_output_dir

    if fmt not in FORMATS:
        raise SecateurError(f"--format is one of {', '.join(FORMATS)}, got '{fmt}'")
    outtype = outtype or DEFAULT_OUTTYPE[fmt]
    allowed = OUTTYPES if fmt == "gguf" else tuple(DTYPES)
    if outtype not in allowed:
        raise SecateurError(f"--outtype for {fmt} is one of {', '.join(allowed)}, got "
                            f"'{outtype}'")
    if fmt == "gguf":
        check_gguf_output(out, overwrite, inputs)
    else:
        check_output_dir(out, overwrite, inputs)
    return outtype


def export_model(model: nn.Module, tokenizer: Any, fmt: str, out: str | Path,
                 overwrite: bool = False, outtype: str | None = None, name: str = "model",
                 inputs: tuple[str, ...] = (), quantized: dict[str, Any] | None = None,
                 has_imatrix: bool = False) -> dict[str, Any]:
    """Write an in-memory model (e.g. just pruned) in format `fmt` to `out`; `quantized`
    holds the codes a gguf quantize step chose (`secateur.quant.ggml.ggml_states`)."""
    from secateur.formats.gguf import read_gguf_layout, write_gguf
    from secateur.formats.llama_layout import read_layout
    from secateur.formats.nemotron_nas import write_nemotron_nas
    from secateur.io import dir_bytes

    out = Path(out)
    outtype = _check(fmt, outtype, out, overwrite, inputs)
    layout = read_gguf_layout(model, name) if fmt == "gguf" else read_layout(model, name)
    if fmt == "gguf":
        written = write_gguf(layout, tokenizer, out, overwrite, outtype, inputs, quantized,
                             has_imatrix)
    else:
        write_nemotron_nas(layout, tokenizer, out, overwrite, outtype, inputs)
        written = {"architecture": "DeciLMForCausalLM", "outtype": outtype,
                   "layers": len(layout.layers)}
    layers = layout.layers
    return {"model": name, "format": fmt, "out": str(out), **written, "bytes": dir_bytes(out),
            "layers_without_attention": [i for i, s in enumerate(layers) if not s.has_attention],
            "layers_without_mlp": [i for i, s in enumerate(layers) if not s.has_mlp],
            "stock_shape": layout.is_stock}


def export(model: str | Path, fmt: str, out: str | Path, overwrite: bool = False,
           outtype: str | None = None) -> dict[str, Any]:
    """Load `model` (a folder, Hub or built-in name) and write it in format `fmt` to `out`
    (a folder for nemotron-nas, a file for gguf)."""
    from secateur.formats.loader import load

    inputs = (str(model),)
    _check(fmt, outtype, Path(out), overwrite, inputs)  # before the (slow) load
    loaded = load(model)
    return export_model(loaded.model, loaded.tokenizer, fmt, out, overwrite, outtype,
                        str(model), inputs)
