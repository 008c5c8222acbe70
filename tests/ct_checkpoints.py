"""Compressed-tensors checkpoints written by compressed-tensors itself, the way llm-compressor
writes them (apply the config, calibrate min-max, compress, save, update config.json), so the
loaders are tested on files that secateur's own writer did not shape."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.tiny_models import byte_tokenizer, tiny_model


def _scheme(bits: int, symmetric: bool, group: int | None, activations: bool, kind: str):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(num_bits=bits, type=kind, symmetric=symmetric,
                               strategy="group" if group else "channel", group_size=group)
    inputs = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token",
                              dynamic=True) if activations else None
    return QuantizationScheme(targets=["Linear"], weights=weights, input_activations=inputs)


@torch.no_grad()
def _calibrate(model: torch.nn.Module) -> None:
    """Min-max scales and zero points for every quantized linear (llm-compressor's RTN)."""
    from compressed_tensors.quantization.utils import calculate_qparams

    for module in model.modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None or scheme.weights is None:
            continue
        args = scheme.weights
        w = module.weight
        groups = w.reshape(w.shape[0], -1, args.group_size) if args.group_size \
            else w.reshape(w.shape[0], 1, -1)
        scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
        module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data.copy_(zero.reshape(module.weight_zero_point.shape))


def write_ct_checkpoint(out: Path, bits: int = 4, symmetric: bool = False,
                        group: int | None = 64, activations: bool = False, kind: str = "int",
                        family: str = "llama", seed: int = 0, model=None,
                        tokenizer=None) -> Path:
    """A tiny model (or `model`) quantized and saved by compressed-tensors' own API, lm_head
    kept dense, with a byte tokenizer (or `tokenizer`)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStatus,
        apply_quantization_config,
    )

    model = tiny_model(family, seed) if model is None else model
    config = QuantizationConfig(
        config_groups={"group_0": _scheme(bits, symmetric, group, activations, kind)},
        ignore=["lm_head"], quantization_status=QuantizationStatus.INITIALIZED)
    apply_quantization_config(model, config)
    _calibrate(model)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(str(out))
    (tokenizer or byte_tokenizer()).save_pretrained(out)
    return Path(out)
