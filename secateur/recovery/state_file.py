"""A training state (nested dicts and lists of tensors, numbers and strings) as one safetensors
file: the tensors as tensors, everything else as JSON in the file's header.

It is what `torch.save` used to hold for resumable training (weights, optimizer moments and
step counts, the RNG state, progress), without pickle: reading one back can only ever give
tensors, numbers and strings, whoever wrote the file. The header alone (`read_meta`) answers
whether a checkpoint is the right one before any tensor is read. Written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from secateur.errors import SecateurError

KEY = "secateur_state"  # the header metadata entry holding the JSON
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor],
            seen: dict[tuple, str]) -> Any:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        # tied weights (embeddings = lm_head) are one tensor: stored once
        ident = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride(), t.storage_offset())
        if t.numel() and ident in seen:
            return {_TENSOR: seen[ident]}
        while path in tensors:  # keys holding '/' could spell another tensor's name
            path += "'"
        seen[ident] = path
        tensors[path] = t
        return {_TENSOR: path}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: _encode(v, f"{path}/{k}", tensors, seen) for k, v in value.items()}
        # an optimizer's state is keyed by parameter index: keep the keys' types
        return {_ITEMS: [[k, _encode(v, f"{path}/{k}", tensors, seen)]
                         for k, v in value.items()]}
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, f"{path}/{i}", tensors, seen) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{path}/{i}", tensors, seen) for i, v in enumerate(value)]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"{path}: a {type(value).__name__} cannot be stored in a state file")


def _decode(value: Any, tensors: dict[str, torch.Tensor] | None) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {_TENSOR}:
        return value if tensors is None else tensors[value[_TENSOR]]
    if set(value) == {_TUPLE}:
        return tuple(_decode(v, tensors) for v in value[_TUPLE])
    if set(value) == {_ITEMS}:
        return {k: _decode(v, tensors) for k, v in value[_ITEMS]}
    return {k: _decode(v, tensors) for k, v in value.items()}


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write `state` to `path` (replaced atomically: the previous file or this one)."""
    from secateur.formats.streaming import write_tensors
    from secateur.io import write_atomic

    tensors: dict[str, torch.Tensor] = {}
    meta = _encode(state, "", tensors, {})
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: write_tensors(tmp, tensors, {KEY: json.dumps(meta)}))


def _header(path: Path) -> tuple[dict[str, Any], Any]:
    from secateur.formats.streaming import read_header

    try:
        header, _ = read_header(path)
        meta = json.loads(header["__metadata__"][KEY])
    except (SecateurError, KeyError, TypeError, ValueError):
        raise SecateurError(f"'{path}' is not a secateur state file (damaged, or written by "
                            "something else)") from None
    if not isinstance(meta, dict):
        raise SecateurError(f"'{path}' is not a secateur state file")
    return header, meta


def read_meta(path: Path) -> dict[str, Any]:
    """Everything but the tensors (each stands as {'__tensor__': name}); reads the header only."""
    return _decode(_header(path)[1], None)


def load_state(path: Path) -> dict[str, Any]:
    """The state `save_state` wrote, tensors read into memory of their own."""
    from secateur.formats.streaming import read_tensors

    header, meta = _header(path)
    names = [k for k in header if k != "__metadata__"]
    try:
        return _decode(meta, read_tensors(path, names))
    except (SecateurError, KeyError, TypeError, ValueError):
        raise SecateurError(f"'{path}' is not a secateur state file (its tensors do not match "
                            "its description)") from None
