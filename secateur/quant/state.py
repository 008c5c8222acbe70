"""What a quantized linear keeps beside its (dequantized) weight, in its state_dict.

After a quantization step a linear's `weight` holds the dequantized values, so the model in
memory evaluates exactly as the saved one will. Its grid is registered on the module the way
compressed-tensors' `initialize_qparams` does it: the tensors `weight_scale`,
`weight_zero_point` (and `weight_g_idx` for act-order with scattered groups) beside the weight,
and the scheme (`QuantScheme`: bits, group size, symmetry, act-order) as a plain attribute.
A layer's `state_dict()` therefore carries its grid, and a checkpoint is safetensors plus the
scheme as JSON. Integer codes are not stored: q = round(w / scale + zero) recovers them exactly,
because every weight sits on the grid. Savers (compressed-tensors pack-quantized) and CPU
runtimes (int4/int8 kernels) read this state; methods write it.

The grid tensors are buffers rather than parameters: `parameters()` feeds parameter counts,
optimizers and full fine-tuning (which makes every parameter trainable), none of which may see
them, while buffers still travel with `state_dict`, `load_state_dict`, `deepcopy` and `.to()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from secateur.errors import SecateurError
from secateur.models.mask import mask_keys
from secateur.quant.ggml_names import ggml_keys
from secateur.quant.scheme import INTEGER, Accepts, QuantScheme

ATTR = "secateur_quant"  # the module's QuantScheme
ACT_ATTR = "secateur_act_quant"  # on a linear: its inputs are quantized at run time
INT8_TOKEN = "int8-token"  # symmetric int8, one scale per token, computed on each call
SCALE, ZERO, G_IDX = "weight_scale", "weight_zero_point", "weight_g_idx"
GRID_TENSORS = (SCALE, ZERO, G_IDX)


@dataclass
class QuantState:
    bits: int
    group_size: int  # -1: one group per output row (per channel)
    symmetric: bool
    scale: torch.Tensor  # (out, groups) float32
    zero: torch.Tensor  # (out, groups) unsigned zero point in [0, 2**bits - 1], float32
    # act-order without static groups: the group of each input column, in original order
    g_idx: torch.Tensor | None = None
    actorder: Literal["group", "weight"] | None = None

    @property
    def scheme(self) -> QuantScheme:
        return QuantScheme(self.bits, self.group_size, self.symmetric, self.actorder)

    def groups_of_columns(self, in_features: int) -> torch.Tensor:
        if self.g_idx is not None:
            return self.g_idx.long()
        size = in_features if self.group_size == -1 else self.group_size
        return torch.arange(in_features) // size

    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        """Integer codes (uint8) of a weight that sits on this grid."""
        g = self.groups_of_columns(weight.shape[1])
        q = torch.round(weight.float() / self.scale[:, g] + self.zero[:, g])
        return q.clamp_(0, 2**self.bits - 1).to(torch.uint8)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        g = self.groups_of_columns(codes.shape[1])
        return (codes.float() - self.zero[:, g]) * self.scale[:, g]


def quant_scheme(module: nn.Module) -> QuantScheme | None:
    return module.__dict__.get(ATTR)


def quant_state(module: nn.Module) -> QuantState | None:
    """The module's grid, read from its registered tensors and scheme."""
    scheme = quant_scheme(module)
    if scheme is None:
        return None
    buffers = module._buffers
    return QuantState(scheme.bits, scheme.group_size, scheme.symmetric, buffers[SCALE],
                      buffers[ZERO], buffers.get(G_IDX), scheme.actorder)


def set_quant_state(module: nn.Module, state: QuantState) -> None:
    """Register the grid's tensors and scheme on the module, replacing any earlier grid."""
    clear_quant_state(module)
    module.register_buffer(SCALE, state.scale)
    module.register_buffer(ZERO, state.zero)
    if state.g_idx is not None:
        module.register_buffer(G_IDX, state.g_idx)
    module.__dict__[ATTR] = state.scheme


def clear_quant_state(module: nn.Module) -> None:
    module.__dict__.pop(ATTR, None)
    for name in GRID_TENSORS:
        module._buffers.pop(name, None)


def activation_quant(linear: nn.Module) -> str | None:
    """How the linear's inputs are quantized at run time (`runtime.int8.mark_w8a8`), if they
    are."""
    return getattr(linear, ACT_ATTR, None)


def check_grid(name: str, state: QuantState, accepts: Accepts = INTEGER) -> None:
    """Refuse a grid the consumer does not take, or whose zero points are not its codes."""
    problem = accepts.refusal(name, state.scheme, int(state.scale.shape[1]))
    if problem is not None:
        raise SecateurError(problem)
    zero = state.zero
    if bool(((zero != zero.round()) | (zero < 0) | (zero > 2**state.bits - 1)).any()):
        raise SecateurError(f"'{name}' has zero points off the integer range [0, "
                            f"{2**state.bits - 1}]: quantize it with secateur's grid")


def codes_on_grid(name: str, weight: torch.Tensor, state: QuantState) -> torch.Tensor:
    """The integer codes of a quantized weight, refusing a weight that left its grid (edited
    after quantization): rounding it back would silently change the model."""
    codes = state.codes(weight)
    dequantized = state.dequantize(codes)
    error = (dequantized - weight.float()).abs()
    g = state.groups_of_columns(weight.shape[1])
    # a 16-bit model holds the grid's values rounded to its dtype
    tolerance = (1e-3 * state.scale[:, g].abs() + 1e-6
                 + 2 * torch.finfo(weight.dtype).eps * dequantized.abs())
    if bool((error > tolerance).any()):
        raise SecateurError(f"'{name}' is no longer on its {state.bits}-bit grid (its weight "
                            "changed after quantizing): quantize it again before packing")
    return codes


def is_quantized(model: nn.Module) -> bool:
    return any(quant_scheme(m) is not None for m in model.modules())


def grid_keys(model: nn.Module) -> set[str]:
    """The state_dict keys of the grid tensors (not weights: dense formats leave them out)."""
    return {f"{name}.{leaf}" if name else leaf
            for name, module in model.named_modules() if quant_scheme(module) is not None
            for leaf in GRID_TENSORS if module._buffers.get(leaf) is not None}


def weights_state_dict(model: nn.Module, keep_vars: bool = False) -> dict[str, torch.Tensor]:
    """`model.state_dict()` without the grid tensors, llama.cpp block buffers
    (`secateur.quant.ggml`) and pruning masks (`secateur.models.mask`): what a dense
    checkpoint holds."""
    skip = grid_keys(model) | ggml_keys(model) | mask_keys(model)
    return {k: v for k, v in model.state_dict(keep_vars=keep_vars).items() if k not in skip}
