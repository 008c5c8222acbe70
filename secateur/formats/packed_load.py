"""Reading a compressed-tensors pack-quantized folder back (`save_packed` writes them).

Two readers share what is here: the CPU runtimes (`packed_runtime.load_packed`) build integer
kernels from each linear's codes and grid, and `load_quantized` puts the model back in memory as
a quantize step leaves it: dense weights on their grids, each linear's `QuantState` (and W8A8
mark) beside them. The weights are dequantized with `QuantState.dequantize`, the arithmetic
the methods use, so a model saved with `keep_dtype=None` comes back bit-identical; this is how a
recipe resumes after a quantize step (`secateur.recipe`). Only safetensors and JSON are read.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from secateur.errors import SecateurError
from secateur.formats.masks import restore_masks
from secateur.formats.packed_save import (
    INT_QUANTIZED,
    PACK_QUANTIZED,
    WEIGHTS,
    compressed_tensors,
    read_quantization_config,
)
from secateur.quant.state import INT8_TOKEN, QuantState, set_quant_state
from secateur.runtime.int8 import mark_w8a8


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a packed folder (one, or the shards its index names)."""
    index = path / f"{WEIGHTS}.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    if (path / WEIGHTS).is_file():
        return [path / WEIGHTS]
    raise SecateurError(f"'{path}' has no {WEIGHTS}: give the directory save_packed wrote")


def ct_quantization_config(path: Path) -> dict | None:
    """The compressed-tensors `quantization_config` of a model folder's config.json, or None
    (no such key, another quantizer's, or an unreadable file, which `load` reports itself)."""
    try:
        data = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    qc = data.get("quantization_config") if isinstance(data, dict) else None
    if isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors":
        return qc
    return None


def _dynamic_int8_tokens(inputs: dict | None) -> bool:
    return not inputs or (inputs.get("type", "int") == "int" and int(inputs["num_bits"]) == 8
                          and inputs.get("strategy") == "token" and bool(inputs.get("dynamic"))
                          and inputs.get("symmetric", True))


def reads_integer_grids(qc: dict) -> bool:
    """Whether `load_quantized` reads every group of `qc`: integer weights stored
    pack-quantized or int-quantized (llm-compressor's W4A16/W8A16, symmetric or not, by group
    or channel, and W8A8 with dynamic per-token activations), nothing on the outputs."""
    groups = qc.get("config_groups") or {}
    formats = (PACK_QUANTIZED, INT_QUANTIZED)
    try:
        return bool(groups) and all(
            (g.get("format") or qc.get("format")) in formats and g.get("weights")
            and g["weights"].get("type", "int") == "int"
            and _dynamic_int8_tokens(g.get("input_activations"))
            and not g.get("output_activations")
            for g in groups.values())
    except (AttributeError, KeyError, TypeError, ValueError):
        return False  # malformed: the transformers route reports it


def _matches(name: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target in (name, "Linear")


def scheme_for(name: str, qc: dict) -> dict:
    """The config group whose targets cover the linear `name`."""
    if any(_matches(name, t) and t != "Linear" for t in qc.get("ignore") or []):
        raise SecateurError(f"'{name}' has packed weights but the config ignores it")
    for group in qc["config_groups"].values():
        if any(_matches(name, t) for t in group["targets"]):
            return group
    raise SecateurError(f"no config group of the quantization_config covers '{name}'")


def state_and_codes(prefix: str, get: Callable[[str], torch.Tensor], keys: set[str],
                    group: dict) -> tuple[torch.Tensor, QuantState, str | None]:
    """Unsigned codes (out, in) and the grid of one linear, from its checkpoint tensors."""
    compressed_tensors()
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    w = group["weights"]
    bits = int(w["num_bits"])
    if w.get("type", "int") != "int":
        raise SecateurError(f"'{prefix}' holds {w['type']} weights: the runtimes take integers")
    half = 2 ** (bits - 1)
    scale = get(f"{prefix}.weight_scale").float()
    if scale.dim() == 1:
        scale = scale[:, None]
    if f"{prefix}.weight_packed" in keys:
        shape = get(f"{prefix}.weight_shape").tolist()
        codes = unpack_from_int32(get(f"{prefix}.weight_packed"), bits, shape).to(torch.int16)
        codes = (codes + half).to(torch.uint8)
    else:  # int-quantized: int8 codes as they are
        codes = (get(f"{prefix}.weight").to(torch.int16) + half).to(torch.uint8)
    zero = torch.full_like(scale, float(half))
    if f"{prefix}.weight_zero_point" in keys:
        packed_zero = get(f"{prefix}.weight_zero_point")
        if packed_zero.dtype == torch.int32:
            packed_zero = unpack_from_int32(packed_zero, bits, (scale.shape[0], scale.shape[1]),
                                            packed_dim=0)
        zero = packed_zero.float() + half
    group_size = int(w.get("group_size") or -1) if w.get("strategy") == "group" else -1
    g_idx = get(f"{prefix}.weight_g_idx") if f"{prefix}.weight_g_idx" in keys else None
    # act-order with static groups leaves the columns in place: only the flag is stored
    actorder = "weight" if w.get("actorder") else None
    state = QuantState(bits, group_size, bool(w.get("symmetric", True)), scale, zero, g_idx,
                       actorder)
    inputs = group.get("input_activations")
    act = None
    if inputs:
        if not (inputs.get("type", "int") == "int" and int(inputs["num_bits"]) == 8
                and inputs.get("strategy") == "token" and inputs.get("dynamic")
                and inputs.get("symmetric", True)):
            raise SecateurError(f"'{prefix}': only dynamic per-token int8 activations run on "
                                "the int8 runtime")
        act = INT8_TOKEN
    return codes, state, act


def skeleton(path: Path, dtype: torch.dtype) -> nn.Module:
    """The folder's model, unquantized classes, its parameters on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # parameters on meta (no memory); buffers (rotary tables) real, as init computes them
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _read_all(path: Path) -> dict[str, torch.Tensor]:
    from secateur.formats.streaming import read_header, read_tensors

    tensors: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        header, _ = read_header(file)
        tensors.update(read_tensors(file, [k for k in header if k != "__metadata__"]))
    return tensors


@torch.no_grad()
def read_quantized(path: str | Path, dtype: str = "float32", grids: bool = True) -> nn.Module:
    """The model of a compressed-tensors folder, its quantized linears dense weights on their
    grids with (`grids`) their `QuantState` and W8A8 mark restored, or (not `grids`) as a plain
    dense model. This reads what transformers' default load refuses: compressed-tensors 0.20
    stores asymmetric pack-quantized zero points packed, while transformers prepares the
    empty model for them unpacked."""
    from accelerate.utils import set_module_tensor_to_device

    from secateur.formats import registry  # noqa: F401 (secateur's per-layer-width classes)
    from secateur.models.loading import DTYPES

    path = Path(path)
    if dtype not in DTYPES:
        raise SecateurError(f"unknown dtype '{dtype}': use one of {', '.join(DTYPES)}")
    qc = read_quantization_config(path)
    torch_dtype = DTYPES[dtype]
    model = skeleton(path, torch_dtype)
    tensors = _read_all(path)
    keys = set(tensors)
    prefixes = sorted(k.rsplit(".", 1)[0] for k in keys if k.endswith(".weight_scale"))
    used: set[str] = set()
    try:
        for prefix in prefixes:
            codes, state, act = state_and_codes(prefix, tensors.__getitem__, keys,
                                                scheme_for(prefix, qc))
            weight = state.dequantize(codes).to(torch_dtype)
            set_module_tensor_to_device(model, f"{prefix}.weight", "cpu", value=weight)
            module = model.get_submodule(prefix)
            if grids:
                set_quant_state(module, state)
                if act == INT8_TOKEN:
                    mark_w8a8(module)
            used |= {k for k in keys if k.rsplit(".", 1)[0] == prefix} - {f"{prefix}.bias"}
        for key in sorted(keys - used):
            tensor = tensors.pop(key)
            if tensor.is_floating_point():
                tensor = tensor.to(torch_dtype)
            set_module_tensor_to_device(model, key, "cpu", value=tensor)
    except (KeyError, AttributeError, ValueError, RuntimeError) as err:
        raise SecateurError(f"'{path}' does not match its config ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''})") from None
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise SecateurError(f"'{path}' lacks {len(missing)} tensors (e.g. {missing[0]}): the "
                            "checkpoint is incomplete")
    if (path / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)
    model.eval()
    return model


def load_quantized(path: str | Path, dtype: str = "float32") -> Any:
    """A `save_packed` folder as a `Loaded` model whose quantized linears are dense weights on
    their grids with their `QuantState` (and W8A8 mark) restored, ready for further steps or to
    be packed again."""
    from transformers import AutoTokenizer

    from secateur.models.base import adapter_for
    from secateur.models.loading import Loaded

    model = read_quantized(path, dtype)
    restore_masks(model, Path(path))  # only a checkpoint of secateur's own has any
    tokenizer = AutoTokenizer.from_pretrained(path)
    return Loaded(model, tokenizer, adapter_for(model), str(path), str(path))
