"""Saving a quantized model packed, in compressed-tensors' format (transformers and vLLM load it).

Layout (compressed-tensors 0.20, `pack-quantized`), per quantized linear `P`:
- `P.weight_packed` int32 (out, ceil(in * bits / 32)): signed codes q - 2**(bits-1) offset back
  to unsigned and packed densely along the input dimension, 32 codes per `bits` words (8 int4
  codes per int32, code j of a word at bits 4j..4j+3);
- `P.weight_scale` (out, groups) float32, groups = 1 per channel;
- `P.weight_zero_point` (asymmetric only) the signed zero points z - 2**(bits-1), packed the same
  way along the output dimension; symmetric grids (z = 2**(bits-1)) store none;
- `P.weight_shape` int64 [out, in]; the bias, when there is one, as usual.
W8A8 linears (int8 weights per channel, activations per token at run time) use the
`int-quantized` format instead: `P.weight` int8 and `P.weight_scale`, the activation scheme in the
config (vLLM runs it on its int8 kernels).

`config.json` carries the `quantization_config` compressed-tensors writes itself (built with
its own classes and `ModelCompressor.update_config`), one config group per distinct scheme,
`ignore` naming every linear left unquantized (the lm_head).

Kept unquantized: the embeddings (and an untied lm_head) in float16 by default, everything else
(norms, biases) in the model's own dtype. The embedding of a small model is a large share of it
(28M of smollm2's 135M parameters), so it must shrink for a 4-bit model to be ~4x smaller;
quantizing it costs quality for every token, and vLLM and transformers expect it dense. float16
rather than bfloat16: these are weights of small magnitude (far inside float16's range up to
65504), where float16 keeps 3 more mantissa bits; bfloat16's extra range buys nothing here.
A tensor outside float16's range is kept in bfloat16 instead. `round_kept_tensors` rounds a
model in memory the same way, so it evaluates exactly as the saved file does.

Act-order with scattered groups (GPTQ `desc_act` without static groups, a `g_idx`) cannot be
stored: compressed-tensors 0.20 removed `actorder="group"` and its `weight_g_idx`. Quantize with
static groups (act-order "weight") to save packed; the int4 runtime still runs such weights.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from secateur.errors import SecateurError
from secateur.formats.masks import write_masks
from secateur.io import atomic_dir, write_json_atomic
from secateur.quant.scheme import W8A8
from secateur.quant.state import (
    INT8_TOKEN,
    QuantState,
    activation_quant,
    check_grid,
    codes_on_grid,
    quant_state,
    weights_state_dict,
)

WEIGHTS = "model.safetensors"
PACK_QUANTIZED = "pack-quantized"
INT_QUANTIZED = "int-quantized"
FLOAT16_MAX = 65504.0


def compressed_tensors() -> Any:
    try:
        import compressed_tensors
    except ImportError:
        raise SecateurError("saving or loading compressed-tensors needs the compressed-tensors "
                            "package: pip install 'secateur[compact]'") from None
    return compressed_tensors


@dataclass(frozen=True)
class Scheme:
    """What one config group says about its linears."""

    bits: int
    group_size: int  # -1: per channel
    symmetric: bool
    actorder: str | None
    activations: str | None  # INT8_TOKEN for W8A8

    @property
    def format(self) -> str:
        return INT_QUANTIZED if self.activations else PACK_QUANTIZED

    def to_ct(self, targets: list[str]) -> Any:
        compressed_tensors()
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

        grouped = self.group_size != -1
        weights = QuantizationArgs(
            num_bits=self.bits, type="int", symmetric=self.symmetric,
            strategy="group" if grouped else "channel",
            group_size=self.group_size if grouped else None,
            **({"actorder": self.actorder} if self.actorder else {}))
        inputs = None
        if self.activations == INT8_TOKEN:
            inputs = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token",
                                      dynamic=True)
        return QuantizationScheme(targets=targets, weights=weights, input_activations=inputs,
                                  format=self.format)


def _has_scattered_groups(state: QuantState, in_features: int) -> bool:
    if state.g_idx is None:
        return False
    size = in_features if state.group_size == -1 else state.group_size
    return not torch.equal(state.g_idx.long(), torch.arange(in_features) // size)


def stored_group(group_size: int, widths: list[int]) -> int:
    """The group width written to disk for linears of these input widths sharing a grid.

    compressed-tensors needs groups that divide the input width, so a grid whose last group is
    partial (576 columns in groups of 128: 4 x 128 + 64, as GPTQ's reference makes them) is
    stored in groups of gcd(128, 576) = 64, each scale repeated over the narrower groups it
    covers: the same weights, a few more scale bytes. The gcd runs over every linear of the
    grid so the model keeps one config group (transformers' dequantizing load reads only one).
    """
    return -1 if group_size == -1 else math.gcd(group_size, *widths)


def stored_grid(state: QuantState, in_features: int, size: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (out, in_features / size), `size` a divisor of the group size."""
    if size in (-1, state.group_size):
        return state.scale.float(), state.zero.float()
    index = torch.arange(in_features // size) * size // state.group_size
    return state.scale[:, index].float(), state.zero[:, index].float()


def require_linear(name: str, module: nn.Module) -> None:
    if not isinstance(module, nn.Linear):
        raise SecateurError(
            f"'{name}' is a {type(module).__name__}: compressed-tensors packs nn.Linear "
            "weights only, so this model cannot be saved quantized; quantize without --out "
            "(in memory) or prune it instead")


def check_packable(adapter: Any) -> None:
    """Before a run that will save quantized weights: every projection can be packed."""
    for name, proj in adapter.linears(adapter.layers[0]).items():
        require_linear(name, proj.module)


def scheme_of(name: str, module: nn.Module, state: QuantState) -> Scheme:
    """The linear's scheme with its own group size (`stored_group` narrows it later)."""
    require_linear(name, module)
    check_grid(name, state)
    if _has_scattered_groups(state, module.in_features) and state.group_size != -1:
        raise SecateurError(f"'{name}' uses act-order with scattered groups (g_idx), which "
                            "compressed-tensors cannot store: quantize with static groups "
                            "(actorder='weight') or use the int4 runtime unsaved")
    half = 2 ** (state.bits - 1)
    symmetric = bool((state.zero == half).all())
    act = activation_quant(module)
    if act is not None:
        check_grid(name, replace(state, symmetric=symmetric), W8A8)
    actorder = "weight" if state.actorder is not None else None
    return Scheme(state.bits, state.group_size, symmetric, actorder, act)


def pack_codes(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Unsigned codes -> compressed-tensors' int32 words (along `dim`)."""
    compressed_tensors()
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    signed = (codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
    return pack_to_int32(signed, bits, packed_dim=dim)


def packed_tensors(name: str, module: nn.Linear, state: QuantState,
                   scheme: Scheme) -> dict[str, torch.Tensor]:
    """The tensors that replace `name.weight` in the checkpoint (`scheme`: as stored)."""
    codes = codes_on_grid(name, module.weight, state)
    scale, zero = stored_grid(state, module.in_features, scheme.group_size)
    if scheme.format == INT_QUANTIZED:
        return {f"{name}.weight": (codes.to(torch.int16) - 128).to(torch.int8),
                f"{name}.weight_scale": scale.contiguous()}
    out = {f"{name}.weight_packed": pack_codes(codes, state.bits),
           f"{name}.weight_scale": scale.contiguous(),
           f"{name}.weight_shape": torch.tensor(list(module.weight.shape), dtype=torch.int64)}
    if not scheme.symmetric:
        out[f"{name}.weight_zero_point"] = pack_codes(zero.round().to(torch.uint8), state.bits,
                                                      dim=0)
    return out


def storage_dtype(tensor: torch.Tensor, keep_dtype: torch.dtype) -> torch.dtype:
    """float16 unless the tensor overflows it (then bfloat16)."""
    if keep_dtype == torch.float16 and float(tensor.abs().max()) > FLOAT16_MAX:
        return torch.bfloat16
    return keep_dtype


def _embedding_ids(model: nn.Module) -> set[int]:
    """ids of the embedding matrices (input, and output when it is not a quantized linear)."""
    ids = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        if module is not None and quant_state(module) is None:
            ids.add(id(module.weight))
    return ids


@torch.no_grad()
def round_kept_tensors(model: nn.Module, keep_dtype: torch.dtype | None = torch.float16) -> None:
    """Round the embeddings in memory as `save_packed` stores them, so the model in memory
    gives the logits the saved one will."""
    if keep_dtype is None:
        return
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        if module is not None and quant_state(module) is None:
            w = module.weight
            w.copy_(w.to(storage_dtype(w, keep_dtype)).to(w.dtype))


def write_quantization_config(model: nn.Module, groups: dict[Scheme, list[str]],
                              ignore: list[str], directory: Path) -> None:
    """config.json's quantization_config for the packed groups, as compressed-tensors writes it."""
    compressed_tensors()
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = next(model.parameters()).dtype
    config.save_pretrained(directory)
    single = len(groups) == 1
    config_groups = {f"group_{i}": scheme.to_ct(["Linear"] if single else names)
                     for i, (scheme, names) in enumerate(groups.items())}
    formats = {s.format for s in groups}
    qc = QuantizationConfig(config_groups=config_groups,
                            format=formats.pop() if len(formats) == 1 else "mixed-precision",
                            quantization_status="compressed", ignore=ignore)
    ModelCompressor(quantization_config=qc).update_config(str(directory))
    if any(not s.symmetric and s.format == PACK_QUANTIZED for s in groups):
        # compressed-tensors 0.20 packs asymmetric zero points on save but, when transformers
        # prepares the empty model, expects them unpacked (its meta-device compress skips
        # them), so the default load fails on their shape; its dequantize-at-load path reads
        # them right. vLLM reads the packed zero points and ignores this key.
        path = directory / "config.json"
        data = json.loads(path.read_text())
        data["quantization_config"]["dequantize"] = True
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def packed_state_dict(model: nn.Module, keep_dtype: torch.dtype | None = torch.float16
                      ) -> tuple[dict[str, torch.Tensor], dict[Scheme, list[str]], list[str]]:
    """Every tensor to write, the linears of each scheme, and the linears left unquantized."""
    found: dict[str, tuple[nn.Linear, QuantState, Scheme]] = {}
    ignore: list[str] = []
    for name, module in model.named_modules():
        state = quant_state(module)
        if state is not None:
            found[name] = (module, state, scheme_of(name, module, state))
        elif isinstance(module, nn.Linear):
            ignore.append(name)
    if not found:
        raise SecateurError("the model has no quantized linears to pack: quantize it first "
                            "(gptq, rtn or w8a8) or save it in the default format")
    widths: dict[Scheme, list[int]] = {}
    for module, _, scheme in found.values():
        widths.setdefault(scheme, []).append(module.in_features)
    groups: dict[Scheme, list[str]] = {}
    quantized: dict[str, tuple[nn.Linear, QuantState, Scheme]] = {}
    for name, (module, state, scheme) in found.items():
        stored = replace(scheme, group_size=stored_group(scheme.group_size, widths[scheme]))
        quantized[name] = (module, state, stored)
        groups.setdefault(stored, []).append(name)
    if len(groups) > 1 and any(not s.symmetric for s in groups):
        raise SecateurError("linears with different grids, some asymmetric, cannot be loaded by "
                            "transformers (its dequantizing load applies one grid to all): "
                            "quantize every linear alike, or symmetric")
    embeddings = _embedding_ids(model)
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in weights_state_dict(model, keep_vars=True).items():
        prefix, _, leaf = key.rpartition(".")
        if prefix in quantized and leaf == "weight":
            continue
        if id(tensor) in seen:  # tied (lm_head = embeddings): transformers ties it back
            continue
        seen.add(id(tensor))
        t = tensor.detach()
        if id(tensor) in embeddings and keep_dtype is not None and t.is_floating_point():
            t = t.to(storage_dtype(t, keep_dtype))
        out[key] = t.contiguous()
    for name, (module, state, scheme) in quantized.items():
        out.update(packed_tensors(name, module, state, scheme))
    return out, groups, ignore


def save_packed(model: nn.Module, tokenizer: Any, out: Path, metadata: dict | None = None,
                overwrite: bool = False, keep_dtype: torch.dtype | None = torch.float16,
                own_state: bool = False) -> Path:
    """Write `model` (its linears quantized, each with a `QuantState`) as a compressed-tensors
    checkpoint that `AutoModelForCausalLM.from_pretrained` and vLLM load without secateur.

    `keep_dtype`: the storage dtype of the embeddings (None: the model's own dtype).
    `own_state`: also write the pruning masks beside the weights, for a checkpoint that
    secateur reads back (`secateur.formats.masks`). Nothing is written when a check fails.
    """
    tensors, groups, ignore = packed_state_dict(model, keep_dtype)  # every check runs here
    with atomic_dir(Path(out), overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        if own_state:
            write_masks(model, tmp)
        write_quantization_config(model, groups, ignore, tmp)
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        record = {"format": "compressed-tensors",
                  "schemes": [{**scheme.__dict__, "format": scheme.format, "linears": len(n)}
                              for scheme, n in groups.items()],
                  "unquantized_linears": ignore,
                  "embeddings_dtype": str(keep_dtype).replace("torch.", "")
                  if keep_dtype else "model dtype"}
        write_json_atomic(tmp / "secateur.json", {**(metadata or {}), "packed": record})
    return Path(out)


def read_quantization_config(path: Path) -> dict:
    """The `quantization_config` of a packed directory, or a one-line error saying what it is."""
    config = Path(path) / "config.json"
    if not config.is_file():
        raise SecateurError(f"'{path}' is not a model directory (no config.json)")
    qc = json.loads(config.read_text()).get("quantization_config")
    if not qc or qc.get("quant_method") != "compressed-tensors":
        raise SecateurError(f"'{path}' holds no quantized weights (no compressed-tensors "
                            "quantization_config): quantize it (gptq, rtn or w8a8) and save with "
                            "--format compressed-tensors")
    if qc.get("format") not in (PACK_QUANTIZED, INT_QUANTIZED, "mixed-precision"):
        raise SecateurError(f"'{path}' is compressed-tensors '{qc.get('format')}': the runtimes "
                            f"read {PACK_QUANTIZED} and {INT_QUANTIZED}")
    return qc
