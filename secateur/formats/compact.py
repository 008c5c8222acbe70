"""Compact storage of masked weights: a packed bitmask plus the kept values, in safetensors.

compressed-tensors 0.20 keeps `sparse-bitmask` only as a legacy format name with no compressor,
so secateur uses its own small, documented layout (format `secateur-bitmask-v1`):

- `model.compact.safetensors` holds every tensor of the state dict. A 2-D weight with zeros is
  stored as two tensors: `NAME::bitmask`, uint8 of shape (out, ceil(in / 8)) with bit j%8 of
  byte j//8 set where column j is kept (little bit order, as `numpy.packbits(bitorder="little")`),
  and `NAME::values`, the kept values in row-major order (1-D, original dtype). Other tensors
  are stored as they are. Tied tensors are stored once.
- `secateur_compact.json` records the format, each compressed tensor's shape and the N:M pattern
  when there is one, so tools can rebuild the dense view without secateur.
- `config.json` and the tokenizer files are the usual Hugging Face ones.

Dense bytes per weight at 50% fp32 sparsity: 4 -> 2.125 (values 2 + mask 0.125).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from secateur.errors import SecateurError
from secateur.io import atomic_dir, write_json_atomic
from secateur.models import adapter_for
from secateur.quant.state import weights_state_dict

FORMAT = "secateur-bitmask-v1"
WEIGHTS = "model.compact.safetensors"
INDEX = "secateur_compact.json"


def pack(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    keep = (weight != 0).numpy()
    bits = np.packbits(keep, axis=1, bitorder="little")
    return torch.from_numpy(bits), weight[weight != 0].contiguous()


def unpack(bits: torch.Tensor, values: torch.Tensor, shape: list[int]) -> torch.Tensor:
    keep = np.unpackbits(bits.numpy(), axis=1, count=shape[1], bitorder="little").astype(bool)
    dense = torch.zeros(shape, dtype=values.dtype)
    dense[torch.from_numpy(keep)] = values
    return dense


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    seen: set[int] = set()
    state = {}
    for name, tensor in weights_state_dict(model).items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        state[name] = tensor.detach().cpu().contiguous()
    return state


def save_compact(model: nn.Module, tokenizer: Any, out: Path, metadata: dict | None = None,
                 overwrite: bool = False, nm: str | None = None) -> Path:
    tensors: dict[str, torch.Tensor] = {}
    index: dict[str, Any] = {"format": FORMAT, "nm": nm, "compressed": {}}
    # only decoder projections carry masks; embeddings and head stay as they are
    adapter = adapter_for(model)
    layers = adapter.layers_path + "."
    for name, tensor in _unique_state(model).items():
        if tensor.dim() == 2 and name.endswith(".weight") and (tensor == 0).any() \
                and name.startswith(layers):
            bits, values = pack(tensor)
            tensors[f"{name}::bitmask"], tensors[f"{name}::values"] = bits, values
            index["compressed"][name] = {"shape": list(tensor.shape),
                                         "dtype": str(tensor.dtype).removeprefix("torch.")}
        else:
            tensors[name] = tensor
    with atomic_dir(out, overwrite) as tmp:
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        write_json_atomic(tmp / INDEX, index)
        if metadata is not None:
            write_json_atomic(tmp / "secateur.json", metadata)
    return Path(out)


def is_compact(path: Path) -> bool:
    return (Path(path) / INDEX).is_file()


def dense_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The dense view of a compact checkpoint's tensors."""
    path = Path(path)
    try:
        index = json.loads((path / INDEX).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SecateurError(f"{path / INDEX} is unreadable ({err}): re-save the compact "
                            "model") from None
    if not isinstance(index, dict) or not isinstance(index.get("compressed"), dict):
        raise SecateurError(f"{path / INDEX} is not a secateur compact index: re-save the "
                            "compact model")
    if index.get("format") != FORMAT:
        raise SecateurError(f"{path / INDEX}: unknown compact format {index.get('format')!r}")
    raw = load_file(str(path / WEIGHTS))
    state = {k: v for k, v in raw.items() if "::" not in k}
    for name, info in index["compressed"].items():
        state[name] = unpack(raw[f"{name}::bitmask"], raw[f"{name}::values"], info["shape"])
    return state


def load_compact(path: Path, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                             trust_remote_code=trust_remote_code)
    missing, unexpected = model.load_state_dict(dense_state_dict(path), strict=False)
    model.tie_weights()
    untied = [k for k in missing if not _is_tied(model, k)]
    if untied or unexpected:
        raise SecateurError(f"{path}: compact checkpoint does not match its config "
                            f"(missing {untied[:3]}, unexpected {unexpected[:3]})")
    return model.to(dtype)


def _is_tied(model: nn.Module, key: str) -> bool:
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    return key.endswith("weight") and head is not None and head.weight is emb.weight
