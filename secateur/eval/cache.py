"""The dense model's perplexity, computed once per model and protocol and then read back.

A prune or quantize run reports the dense figure beside its output's; evaluating the dense
model every time doubled the cost of a run. An entry is keyed by a hash of everything that
decides the figure: the model's files (weights, config, tokenizer; for a built-in name the
file it loads from), the text, and the protocol (split, seqlen, windows, bos, dtype, compute
dtype, secateur and transformers versions). Entries are JSON written atomically; one that does
not parse or does not match its key is ignored with a warning, never trusted.

Location: $SECATEUR_PERPLEXITY_CACHE, else `perplexity/` in secateur's cache folder
($SECATEUR_CACHE or ~/.cache/secateur).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

from secateur.io import write_json_atomic
from secateur.offline import cache_dir

ENV = "SECATEUR_PERPLEXITY_CACHE"
# Files of a model folder that cannot change its logits.
_SKIPPED_SUFFIXES = (".md", ".png", ".txt.lock")


def cache_folder() -> Path:
    root = os.environ.get(ENV)
    return Path(root).expanduser() if root else cache_dir() / "perplexity"


def _hash_file(digest: Any, path: Path) -> None:
    digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)


def _model_files(name: str) -> list[Path] | None:
    """The files a load of `name` reads, or None when they cannot be told (a Hub name not in
    the local Hugging Face cache): then nothing is cached."""
    from secateur.models.loading import OFFLINE

    if name in OFFLINE:
        return [OFFLINE[name]()]  # the packaged file the built-in model is dequantized from
    path = Path(name).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(name, local_files_only=True))
        except Exception:
            return None
    files = [p for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith(".")
             and not p.name.endswith(_SKIPPED_SUFFIXES)]
    return files or None


def model_hash(name: str) -> str | None:
    """sha256 over the model's files (names, sizes, bytes), or None if they cannot be told."""
    files = _model_files(name)
    if files is None:
        return None
    digest = hashlib.sha256()
    for file in files:
        _hash_file(digest, file)
    return digest.hexdigest()


def protocol_key(source: Any, spec: Any, dtype: str) -> dict[str, Any]:
    """Everything besides the model that decides the figure; the text by its hash."""
    from importlib.metadata import version

    text = hashlib.sha256(source.joined().encode("utf-8")).hexdigest()
    return {"data": spec.data, "text_sha256": text, "split": source.split,
            "seqlen": spec.seqlen, "max_windows": spec.max_windows, "protocol": spec.protocol,
            "bos": spec.bos, "dtype": dtype, "compute_dtype": spec.compute_dtype,
            "secateur": version("secateur"), "transformers": version("transformers")}


def entry_path(key: dict[str, Any]) -> Path:
    blob = json.dumps(key, sort_keys=True).encode()
    return cache_folder() / f"{hashlib.sha256(blob).hexdigest()[:32]}.json"


def _valid(figure: Any) -> bool:
    try:
        value = float(figure["perplexity"])
    except (TypeError, KeyError, ValueError):
        return False
    return math.isfinite(value) and value >= 1.0


def read(key: dict[str, Any]) -> tuple[dict[str, Any], Path] | None:
    """The cached result for `key` and its file, or None (absent, or ignored as corrupt)."""
    path = entry_path(key)
    if not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
        ok = isinstance(entry, dict) and entry.get("key") == key and _valid(entry.get("result"))
    except (OSError, ValueError):
        ok = False
    if not ok:
        warnings.warn(f"ignoring the corrupt perplexity cache entry '{path}' (it is recomputed "
                      "and replaced)", stacklevel=2)
        return None
    return entry["result"], path


def write(key: dict[str, Any], result: dict[str, Any]) -> Path | None:
    """Store `result` under `key`; a cache that cannot be written is only a warning."""
    path = entry_path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"key": key, "result": result})
    except OSError as err:
        warnings.warn(f"cannot write the perplexity cache '{path}' ({err.strerror or err}); "
                      f"set {ENV} or SECATEUR_CACHE to a writable folder", stacklevel=2)
        return None
    return path


def key_for(model_name: str, source: Any, spec: Any, dtype: str, device: str = "cpu"
            ) -> dict[str, Any] | None:
    """The cache key of `model_name` evaluated as `spec` on `source`, or None (uncacheable).
    A figure from another device is another entry (CPU keys are as before the device flag)."""
    digest = model_hash(model_name)
    if digest is None:
        return None
    key = {"model_sha256": digest, **protocol_key(source, spec, dtype)}
    if device != "cpu":
        key["device"] = device
    return key
