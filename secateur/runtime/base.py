"""What every runtime linear shares: its shape, its bias, and the bytes it reads per call."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from secateur.errors import SecateurError


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
