"""`load(name_or_path)`: any model secateur can read, in whichever format it is stored.

A Hub name, a built-in name or a plain Hugging Face folder or .gguf file loads through
transformers (`secateur.models.loading` holds those checks and the built-in names); a folder
secateur saved is read by the reader of its format: a compact bitmask (`compact`), a
compressed-tensors folder with integer grids (`packed_load`), secateur's own classes for
heterogeneous models (`registry`), or, with `runtime`, the CPU integer kernels
(`packed_runtime`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from secateur.errors import SecateurError
from secateur.formats.ggml_blocks import restore_blocks
from secateur.formats.masks import restore_masks
from secateur.inputs import check_finite, check_loading_info
from secateur.models.base import adapter_for
from secateur.models.load_report import describe_mismatch, mismatched_shapes
from secateur.models.loading import (
    DTYPES,
    OFFLINE,
    WEIGHT_FILES,
    Loaded,
    check_gguf,
    check_model_config,
    check_safetensors,
    check_supported,
    dequantize_to_cache,
    first_line,
)


def check_model_weights(path: Path, name: str) -> None:
    """Fail in one line if a local model folder's weights are missing or truncated."""
    from secateur.formats.compact import INDEX, WEIGHTS, is_compact

    if is_compact(path):
        check_safetensors(path / WEIGHTS)
        return
    present = [f for f in WEIGHT_FILES if (path / f).is_file()]
    if not present:
        raise SecateurError(f"'{name}' has a config.json but no weights ({', '.join(WEIGHT_FILES)}"
                            f" or {INDEX}): copy the weight files into it or re-save the model")
    if "model.safetensors" in present:
        check_safetensors(path / "model.safetensors")
    elif "model.safetensors.index.json" in present:
        index = path / "model.safetensors.index.json"
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise SecateurError(f"'{index}' is damaged: {'re-save or re-download the model'}"
                                ) from None
        for shard in shards:
            if not (path / shard).is_file():
                raise SecateurError(f"'{name}' lacks the weight file '{shard}' that "
                                    f"{index.name} lists: copy it in or re-save the model")
            check_safetensors(path / shard)


def _dequantizing(config):
    """`config` with its compressed-tensors quantization_config set to dequantize at load."""
    qc = config.quantization_config
    if isinstance(qc, dict):
        config.quantization_config = {**qc, "dequantize": True}
    else:
        qc.dequantize = True
    return config


def load(
    name_or_path: str | Path,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    runtime: str | None = None,
    head: str = "float16",
) -> Loaded:
    """Load a causal LM with its tokenizer and architecture adapter.

    `runtime` ("int4", "int8") runs a compressed-tensors pack-quantized folder on secateur's
    CPU integer kernels instead of dequantizing it to `dtype` as transformers does; `head`
    ("float16", "int8") is the runtime's lm_head format (`secateur.runtime.head`)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from secateur.runtime.head import check_head

    if dtype not in DTYPES:
        raise SecateurError(f"unknown dtype '{dtype}': use one of {', '.join(DTYPES)}")
    check_head(head, runtime)
    name = str(name_or_path)
    path = Path(name).expanduser()
    gguf_file: str | None = None
    if name in OFFLINE:
        path = dequantize_to_cache(name)
    elif path.is_file() and path.suffix.lower() == ".gguf":
        check_gguf(path)
        gguf_file, path = path.name, path.parent
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise SecateurError(f"'{name}' is a directory but not a model (no config.json): "
                                f"give a Hugging Face model directory, a .gguf file, a Hub "
                                f"name, or one of {', '.join(OFFLINE)}")
        check_model_config(path)
    elif path.exists():
        raise SecateurError(f"'{name}' is a file but not a model: give a model directory, a "
                            f".gguf file, a Hub name, or one of {', '.join(OFFLINE)}")
    local = name in OFFLINE or path.exists()
    source = str(path) if local else name
    shown = f"{path / gguf_file}" if gguf_file else name
    # Some of our saved models (per-layer widths, removed blocks) need our classes registered.
    from secateur.formats import registry as _registry  # noqa: F401

    try:
        config = AutoConfig.from_pretrained(source, gguf_file=gguf_file,
                                            trust_remote_code=trust_remote_code)
    except Exception as err:
        if local:
            raise SecateurError(f"cannot read the config of '{shown}' ({first_line(err)}): "
                                "the file is damaged or not a model; re-save or re-download "
                                "it") from err
        raise SecateurError(f"cannot load '{name}': not a local model, not a built-in name "
                            f"({', '.join(OFFLINE)}), and the Hub gave: {first_line(err)}"
                            ) from err
    check_supported(config)
    if gguf_file is None and path.is_dir():
        check_model_weights(path, name)
    # transformers logs a long warning for GGUF dequantization on every load; we know.
    logging.getLogger("transformers.modeling_utils").setLevel(logging.ERROR)
    from secateur.formats.compact import is_compact, load_compact
    from secateur.formats.packed_load import (
        ct_quantization_config,
        read_quantized,
        reads_integer_grids,
    )

    # compressed-tensors folders (llm-compressor's and ours) come back as plain dense models,
    # the way every command takes them (a prune or LoRA moves weights off the grids, so none
    # is kept; `load_quantized` keeps them): our reader for integer grids, which transformers
    # refuses when zero points are packed, else transformers' dequantize-at-load. Activations
    # of W8A8 run unquantized here; runtime="int8" runs them as vLLM does.
    quantized = ct_quantization_config(path) if gguf_file is None and path.is_dir() else None

    # Local files passed the checks above; whatever else breaks in the loaders is damage the
    # checks cannot see (a corrupt tensor, an unreadable tokenizer): one line, not a traceback.
    where = "local files" if local else "Hub files"
    try:
        if runtime is not None:
            from secateur.formats.packed_runtime import load_packed

            model = load_packed(path, runtime, dtype, head)
        elif path.is_dir() and is_compact(path):
            model = load_compact(path, DTYPES[dtype], trust_remote_code)
        elif quantized is not None and reads_integer_grids(quantized):
            model = read_quantized(path, dtype, grids=False)
        else:
            extra = {"config": _dequantizing(config)} if quantized is not None else {}
            model, info = AutoModelForCausalLM.from_pretrained(
                source, gguf_file=gguf_file, dtype=DTYPES[dtype],
                trust_remote_code=trust_remote_code, output_loading_info=True, **extra)
            if gguf_file is None:  # transformers only logs these, and we mute its log
                check_loading_info(info, shown)
    except (SecateurError, MemoryError):
        raise
    except Exception as err:
        mismatched = mismatched_shapes(err)
        if mismatched:
            raise SecateurError(describe_mismatch(shown, mismatched)) from err
        raise SecateurError(f"cannot load the weights of '{shown}' ({first_line(err)}): the "
                            f"{where} are damaged or incomplete; re-save or re-download the "
                            "model") from err
    check_finite(model, shown)
    if runtime is None and gguf_file is None and path.is_dir():
        restore_masks(model, path)  # only a checkpoint of secateur's own has any
        restore_blocks(model, path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file,
                                                  trust_remote_code=trust_remote_code)
    except Exception as err:
        raise SecateurError(f"cannot load the tokenizer of '{shown}' ({first_line(err)}): "
                            "save the tokenizer files next to the model (tokenizer.json, "
                            "tokenizer_config.json)") from err
    model.eval()
    return Loaded(model, tokenizer, adapter_for(model), name, source)
