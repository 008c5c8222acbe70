"""What a quantized linear keeps beside its (dequantized) weight.

After a quantization step a linear's `weight` holds the dequantized values, so the model in
memory evaluates exactly as the saved one will; its grid lives in `module.secateur_quant`.
Integer codes are not stored: q = round(w / scale + zero) recovers them exactly, because
every weight sits on the grid. Savers (compressed-tensors pack-quantized) and CPU runtimes
(int4/int8 kernels) read this state; methods write it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

ATTR = "secateur_quant"


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


def quant_state(module: nn.Module) -> QuantState | None:
    return getattr(module, ATTR, None)


def set_quant_state(module: nn.Module, state: QuantState) -> None:
    setattr(module, ATTR, state)


def is_quantized(model: nn.Module) -> bool:
    return any(quant_state(m) is not None for m in model.modules())
