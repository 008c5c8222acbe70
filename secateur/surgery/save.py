"""Saving without ever leaving a half-written output directory."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from secateur.errors import SecateurError


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Fail before any work if the output would clobber something."""
    if out.exists() and not overwrite:
        raise SecateurError(f"output directory '{out}' already exists: pass --overwrite or "
                            "choose another --out")
    if out.exists() and not out.is_dir():
        raise SecateurError(f"output path '{out}' exists and is not a directory")


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; it replaces `out` only if the block succeeds."""
    out = Path(out)
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial.", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def write_json_atomic(path: Path, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)


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


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
