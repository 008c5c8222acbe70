"""What every runtime linear shares: its shape, its bias, and the bytes it reads per call."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from secateur.errors import SecateurError
from secateur.quant.state import QuantState


class RuntimeLinear(nn.Module):
    """A linear whose weight lives in a kernel's own integer layout (buffers, not parameters)."""

    def __init__(self, in_features: int, out_features: int,
                 bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def weight_bytes(self) -> int:
        """Bytes a call reads for the weight: every buffer (packed codes, scales, bias)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """The float (out, in) weight this linear computes with, materialised (for counting
        parameters and checks, never at run time): the linear applied to the identity."""
        y = self.forward(torch.eye(self.in_features))
        if self.bias is not None:
            y = y - self.bias
        return y.float().t()

    def logical_parameters(self) -> list[torch.Tensor]:
        """Tensors standing for the parameters of the nn.Linear this replaces (its weight as
        a float tensor, its bias): what parameter counts count."""
        return [self.dense_weight()] + ([] if self.bias is None else [self.bias])

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


def adapted_layers(model: nn.Module) -> tuple[Any, list[nn.Module]] | None:
    """The model's adapter and decoder layers, or None for an architecture secateur has no
    adapter for (the runtimes then leave its layers as they are)."""
    from secateur.models import adapter_for

    try:
        adapter = adapter_for(model)
        return adapter, list(adapter.layers)
    except (SecateurError, AttributeError):
        return None


def runtime_weight_bytes(model: nn.Module) -> int:
    """Bytes of weights a batch-1 decode step reads with runtime linears in place (their
    packed buffers included): `secateur.params.weight_bytes_per_token`."""
    from secateur.params import weight_bytes_per_token

    return weight_bytes_per_token(model)


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


def check_bits(name: str, state: QuantState) -> None:
    if not 1 <= state.bits <= 8:
        raise SecateurError(f"'{name}' has {state.bits}-bit weights: integer formats and "
                            "kernels take 1 to 8 bits")
    zero = state.zero
    if bool(((zero != zero.round()) | (zero < 0) | (zero > 2**state.bits - 1)).any()):
        raise SecateurError(f"'{name}' has zero points off the integer range [0, "
                            f"{2**state.bits - 1}]: quantize it with secateur's grid")
