"""Saving a model without ever leaving a half-written output directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

# The writers live in secateur.io; these names stay importable from here for existing callers.
from secateur.io import atomic_dir, check_output_dir, dir_bytes, write_json_atomic

__all__ = ["atomic_dir", "check_output_dir", "dir_bytes", "save_model", "write_json_atomic"]


def save_model(model: nn.Module, tokenizer: Any, out: Path, metadata: dict | None = None,
               overwrite: bool = False) -> Path:
    """`save_pretrained` (safetensors) plus the tokenizer and secateur's run record."""
    with atomic_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if metadata is not None:
            write_json_atomic(tmp / "secateur.json", metadata)
    return Path(out)

