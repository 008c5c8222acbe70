"""Swapping quantized `nn.Linear`s for runtime linears (int4 / int8 kernels)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from secateur.errors import SecateurError
from secateur.quant.scheme import INT4_RUNTIME, INT8_RUNTIME
from secateur.quant.state import (
    INT8_TOKEN,
    QuantState,
    activation_quant,
    check_grid,
    codes_on_grid,
    quant_state,
)
from secateur.runtime.base import RuntimeLinear
from secateur.runtime.head import Head, apply_head, check_head
from secateur.runtime.int4 import Int4Linear
from secateur.runtime.int8 import Int8Linear, W8A8Linear

Runtime = Literal["int4", "int8"]
RUNTIMES: tuple[str, ...] = ("int4", "int8")
RUNTIME_ATTR = "secateur_runtime"  # on the model: which runtime its linears were swapped for


def check_runtime(runtime: str) -> None:
    if runtime not in RUNTIMES:
        raise SecateurError(f"unknown runtime '{runtime}': use one of {', '.join(RUNTIMES)}")


def runtime_linear(runtime: str, name: str, codes: torch.Tensor, state: QuantState,
                   bias: torch.Tensor | None, act: str | None = None) -> RuntimeLinear:
    """One runtime linear from a weight's codes and grid (`state.scale`, `state.zero`)."""
    if act is not None:
        if runtime != "int8" or act != INT8_TOKEN:
            raise SecateurError(f"'{name}' quantizes its activations to int8 (W8A8): load it "
                                "with runtime='int8'")
        return W8A8Linear.from_codes(codes, state.scale, state.zero, state.bits, bias, name)
    if runtime == "int4":
        check_grid(name, state, INT4_RUNTIME)
        return Int4Linear.from_codes(codes, state.scale, state.zero, state.group_size,
                                     state.g_idx, bias, name)
    return Int8Linear.from_codes(codes, state.scale, state.zero, state.bits, bias, name)


def _quantized_linears(model: nn.Module) -> list[tuple[str, nn.Module, QuantState]]:
    found = []
    for name, module in model.named_modules():
        state = quant_state(module)
        if state is None:
            continue
        if not isinstance(module, nn.Linear):
            raise SecateurError(f"'{name}' is a {type(module).__name__}: the runtimes replace "
                                "nn.Linear only (GPT-2's Conv1D is not supported)")
        check_grid(name, state)
        found.append((name, module, state))
    return found


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.no_grad()
def apply_runtime(model: nn.Module, runtime: Runtime, head: Head = "float16") -> nn.Module:
    """Swap every linear carrying a `QuantState` for an int4/int8 kernel linear, in place.

    Linears without a state stay as they are (the lm_head, anything left unquantized); a model
    with no quantized linear at all is refused rather than quantized here, so the runtime never
    silently changes what the model computes. `head="int8"` rounds the lm_head to int8 per
    row (`runtime.head`).
    """
    check_runtime(runtime)
    check_head(head, runtime)
    targets = _quantized_linears(model)
    if not targets:
        raise SecateurError(f"the model has no quantized linears for the {runtime} runtime: "
                            "quantize it first (gptq, rtn or w8a8) or load a packed directory")
    # every check first, so a refusal leaves the model untouched
    for name, module, state in targets:
        if activation_quant(module) is not None and runtime != "int8":
            raise SecateurError(f"'{name}' quantizes its activations to int8 (W8A8): use "
                                "runtime='int8'")
        check_grid(name, state, INT4_RUNTIME if runtime == "int4" else INT8_RUNTIME)
    for name, module, state in targets:
        codes = codes_on_grid(name, module.weight, state)
        new = runtime_linear(runtime, name, codes, state, module.bias,
                             activation_quant(module))
        replace_module(model, name, new.to(module.weight.dtype))
    apply_head(model, head)
    finish_runtime(model, runtime)
    return model


def finish_runtime(model: nn.Module, runtime: str) -> None:
    """What every runtime model gets once its linears are swapped: int4 linears sharing an
    input fused into one call, the one-token decode path, and the runtime's name."""
    from secateur.runtime.decode import install_decode_path  # both import this module
    from secateur.runtime.fuse import fuse_shared_inputs

    if runtime == "int4":
        fuse_shared_inputs(model)
    install_decode_path(model)
    setattr(model, RUNTIME_ATTR, runtime)
