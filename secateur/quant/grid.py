"""The quantizer grid: a scale and a zero point per output row or per group of input columns.

Follows the GPTQ reference's `quant.py` (`Quantizer.find_params` with perchannel=True, weight=True,
and `quantize`): the range always holds 0; asymmetric grids put the zero point at
round(-min / scale); symmetric ones span [-max|w|, max|w|] with the zero point at (maxq + 1) / 2,
so 0 is always exactly on the grid (pruned weights stay exactly zero once quantized). `mse`
shrinks the range on a grid of 100 steps down to 20% to minimise the |error|^2.4 of each row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import Field, field_validator
from torch import nn

from secateur.config import Config
from secateur.errors import SecateurError
from secateur.quant.scheme import QUANTIZERS
from secateur.quant.state import QuantState, is_quantized


@dataclass(frozen=True)
class Grid:
    """How one group of weights maps to integers (the reference's Quantizer.configure)."""

    bits: int
    symmetric: bool = True
    mse: bool = False
    norm: float = 2.4
    steps: int = 100
    maxshrink: float = 0.8

    def __post_init__(self) -> None:
        if not QUANTIZERS.takes_bits(self.bits):
            raise SecateurError(f"bits must be {QUANTIZERS.min_bits} to {QUANTIZERS.max_bits}, "
                                f"got {self.bits}")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """The dequantized grid point nearest to x (the reference's `quantize`)."""
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero)


def find_params(x: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (each (rows, 1), float32) of every row of `x` (rows, cols)."""
    x = x.float()
    maxq = grid.maxq
    zeros = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    xmin = torch.minimum(x.min(1).values, zeros)
    xmax = torch.maximum(x.max(1).values, zeros)
    if grid.symmetric:
        xmax = torch.maximum(xmin.abs(), xmax)
        # As the reference: a row with no negative weight keeps xmin = 0 (its range is then
        # [-(maxq+1)/2, (maxq-1)/2] * xmax/maxq); only negative minima are mirrored.
        neg = xmin < 0
        xmin[neg] = -xmax[neg]
    flat = (xmin == 0) & (xmax == 0)
    xmin[flat] = -1
    xmax[flat] = 1
    scale = (xmax - xmin) / maxq
    zero = (torch.full_like(scale, (maxq + 1) / 2) if grid.symmetric
            else torch.round(-xmin / scale))
    if grid.mse:
        best = torch.full([x.shape[0]], float("inf"), device=x.device)
        for i in range(int(grid.maxshrink * grid.steps)):
            p = 1 - i / grid.steps
            scale1 = (p * xmax - p * xmin) / maxq
            zero1 = zero if grid.symmetric else torch.round(-p * xmin / scale1)
            err = (quantize(x, scale1.unsqueeze(1), zero1.unsqueeze(1), maxq) - x)
            err = err.abs_().pow_(grid.norm).sum(1)
            better = err < best
            if better.any():
                best[better] = err[better]
                scale[better] = scale1[better]
                zero[better] = zero1[better]
    return scale.unsqueeze(1), zero.unsqueeze(1)


def group_starts(columns: int, group_size: int) -> range:
    return range(0, columns, columns if group_size == -1 else group_size)


def rtn(weight: torch.Tensor, grid: Grid, group_size: int = -1
        ) -> tuple[torch.Tensor, QuantState]:
    """Round to nearest: each group's grid from its own weights. Returns (dequantized, state)."""
    w = weight.detach().float()
    size = w.shape[1] if group_size == -1 else group_size
    scales, zeros, parts = [], [], []
    for start in group_starts(w.shape[1], group_size):
        block = w[:, start:start + size]
        scale, zero = find_params(block, grid)
        parts.append(quantize(block, scale, zero, grid.maxq))
        scales.append(scale)
        zeros.append(zero)
    state = QuantState(grid.bits, group_size, grid.symmetric, torch.cat(scales, 1).cpu(),
                       torch.cat(zeros, 1).cpu())
    return torch.cat(parts, 1), state


def _divisor(width: int, group_size: int) -> int:
    """The largest power of two up to `group_size` that divides `width` (a suggestion)."""
    size = 1
    while size * 2 <= group_size and width % (size * 2) == 0:
        size *= 2
    return size


def check_group_sizes(group_size: int, named_widths: dict[str, int],
                      partial: bool = False) -> None:
    """Refuse, naming the first matrix, a group size that does not divide every input width.

    The solvers themselves handle a narrower last group (GPTQ's reference cuts groups at
    multiples of the size, whatever the width); refusing by default keeps a user who asked for
    "groups of 128" from getting a grid they did not expect without saying so.
    """
    if group_size == -1 or partial:
        return
    bad = {n: w for n, w in named_widths.items() if w % group_size}
    if bad:
        name, width = next(iter(bad.items()))
        size = min(_divisor(w, group_size) for w in named_widths.values())
        raise SecateurError(f"group_size {group_size} does not divide the input width {width} "
                            f"of {name}; use -1 (per channel), a size that divides every "
                            f"input width (e.g. {size}), or partial_groups=true for a "
                            "narrower last group as GPTQ's reference makes it")


def refuse_quantized(model: nn.Module) -> None:
    """Quantizing twice would put a grid on a grid; refuse before any work."""
    config = getattr(model, "config", None)
    if is_quantized(model) or getattr(config, "quantization_config", None) is not None:
        raise SecateurError("this model is already quantized; quantize the dense (or pruned, "
                            "unquantized) model instead")


class QuantGridConfig(Config):
    """The grid settings every quantizing method shares."""

    bits: int = Field(4, ge=QUANTIZERS.min_bits, le=QUANTIZERS.max_bits,
                      description=f"Bits per weight, {QUANTIZERS.min_bits} to "
                                  f"{QUANTIZERS.max_bits}.")
    group_size: int = Field(128, description="Input columns sharing a scale and zero point; "
                                             "-1: one per output row (per channel).")
    symmetric: bool = Field(True, description="Symmetric grid (zero point fixed at the middle) "
                                              "instead of asymmetric (min/max).")
    mse: bool = Field(False, description="Shrink each group's range to minimise its rounding "
                                         "error (the reference's grid search).")
    partial_groups: bool = Field(False, description="Accept a group size that does not divide "
                                                    "an input width: the last group of each "
                                                    "row is narrower, as in GPTQ's reference "
                                                    "(saved in groups of gcd(size, width)).")

    @field_validator("group_size")
    @classmethod
    def _group(cls, value: int) -> int:
        if value != -1 and value < 1:
            raise ValueError("group_size is -1 (per channel) or a positive number of columns")
        return value

    def grid(self) -> Grid:
        return Grid(self.bits, self.symmetric, self.mse)
