"""SparseGPT (Frantar & Alistarh, 2023): OBS pruning with lazy block updates.

Follows the reference `fasterprune`: Hessian H = X^T X, dampening of 1% of its mean diagonal,
the upper Cholesky factor of H^-1, columns visited in blocks of 128; inside a block, the mask
is chosen from w^2 / [H^-1]_jj^2 (per block for unstructured sparsity, every M columns for
N:M) and each pruned weight's error is spread over the columns not yet visited.

With `quantize`, the same solve also rounds every kept weight to a grid (the reference's
`wbits` path): a column's target is its masked weights put on the grid, and the error of both
pruning and rounding is spread. The reference finds one grid per output row from the dense
weight before the solve; with groups, a group's grid is found when the solve reaches it, as in
GPTQ, from its current weights with the pruned ones of the current block set to zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field, field_validator
from torch import nn

from secateur.methods.base import LayerReport, PruneContext, register_method
from secateur.methods.masks import lowest_n_of_m, lowest_per_matrix
from secateur.methods.sparsity import SparsityConfig, SparsityMethod
from secateur.models.base import ModelAdapter, Projection
from secateur.quant.gptq import inverse_hessian_factor, one_thread, output_error
from secateur.quant.grid import (
    Grid,
    QuantGridConfig,
    check_group_sizes,
    find_params,
    quantize,
    refuse_quantized,
)
from secateur.quant.state import QuantState, set_quant_state
from secateur.stats import Hessian, Statistic

BLOCKSIZE = 128
PERCDAMP = 0.01


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float | None,
    nm: tuple[int, int] | None,
    blocksize: int = BLOCKSIZE,
    percdamp: float = PERCDAMP,
) -> torch.Tensor:
    """The pruned and updated weight (out, in); `weight` is left as it was."""
    with one_thread():
        return _solve(weight, hessian_factor(hessian, percdamp), sparsity, nm, blocksize)[0]


@torch.no_grad()
def sparsegpt_prune_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float | None,
    nm: tuple[int, int] | None,
    grid: Grid,
    group_size: int = -1,
    blocksize: int = BLOCKSIZE,
    percdamp: float = PERCDAMP,
) -> tuple[torch.Tensor, QuantState]:
    """Pruned and quantized in one solve: the dequantized weight (out, in) and its grid."""
    with one_thread():
        w, state, _ = _solve(weight, hessian_factor(hessian, percdamp), sparsity, nm,
                             blocksize, grid, group_size)
    assert state is not None
    return w, state


@dataclass
class HessianFactor:
    """What the solve needs of a Hessian, computed once for all matrices that share it."""

    hinv: torch.Tensor  # upper Cholesky factor of the dampened H^-1
    dead: torch.Tensor  # input columns that never saw a non-zero value


@torch.no_grad()
def hessian_factor(hessian: torch.Tensor, percdamp: float = PERCDAMP) -> HessianFactor:
    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    return HessianFactor(inverse_hessian_factor(h, percdamp, "SparseGPT"), dead)


def _solve(
    weight: torch.Tensor,
    factor: HessianFactor,
    sparsity: float | None,
    nm: tuple[int, int] | None,
    blocksize: int,
    grid: Grid | None = None,
    group_size: int = -1,
) -> tuple[torch.Tensor, QuantState | None, torch.Tensor]:
    """The solved weight, its grid (with `grid`) and the pruned positions: the mask chosen
    and the dead columns, which are zeroed too."""
    w = weight.detach().clone().float()
    grids: list[tuple[torch.Tensor, torch.Tensor]] = []
    if grid is not None and group_size == -1:
        grids.append(find_params(w, grid))  # the reference: from the dense weight, first
    w[:, factor.dead] = 0
    pruned = torch.zeros_like(w, dtype=torch.bool)
    pruned[:, factor.dead] = True
    hinv = factor.hinv
    cols = w.shape[1]
    if nm:
        # Blocks must hold whole N:M groups.
        blocksize = nm[1] * math.ceil(blocksize / nm[1])
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d = torch.diag(hinv1)
        if nm:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        else:
            mask1 = lowest_per_matrix(w1**2 / d.unsqueeze(0) ** 2, sparsity)
        if grid is not None:
            _quantized_block(w, w1, err1, hinv1, mask1, i1, nm, grid, group_size, grids)
            pruned[:, i1:i2] |= mask1
            w[:, i1:i2] = w1
            w[:, i2:] -= err1.matmul(hinv[i1:i2, i2:])
            continue
        # err_i = (w_i - q_i) / d_i is w_i * mask_i / d_i; two ops per column keep the
        # Python loop cheap (it runs once per input column of every matrix).
        scale = mask1 / d.unsqueeze(0)
        for i in range(i2 - i1):
            if nm and i % nm[1] == 0:
                group = w1[:, i : i + nm[1]] ** 2 / d[i : i + nm[1]].unsqueeze(0) ** 2
                mask1[:, i : i + nm[1]] = lowest_n_of_m(group, *nm)
                scale[:, i : i + nm[1]] = mask1[:, i : i + nm[1]] / d[i : i + nm[1]]
            torch.mul(w1[:, i], scale[:, i], out=err1[:, i])
            w1[:, i:].addr_(err1[:, i], hinv1[i, i:], alpha=-1)
        # After its own update a column holds q: kept weights (updated by earlier columns)
        # and zeros up to rounding, which the mask makes exact.
        w[:, i1:i2] = w1.masked_fill_(mask1, 0.0)
        pruned[:, i1:i2] |= mask1
        w[:, i2:] -= err1.matmul(hinv[i1:i2, i2:])
    if grid is None:
        return w, None, pruned
    state = QuantState(grid.bits, group_size, grid.symmetric,
                       torch.cat([s for s, _ in grids], 1).cpu(),
                       torch.cat([z for _, z in grids], 1).cpu())
    return w, state, pruned


def _quantized_block(w: torch.Tensor, w1: torch.Tensor, err1: torch.Tensor,
                     hinv1: torch.Tensor, mask1: torch.Tensor, i1: int,
                     nm: tuple[int, int] | None, grid: Grid, group_size: int,
                     grids: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """One block of the joint solve; on return `w1` holds the block's quantized columns."""
    d = torch.diag(hinv1)
    for i in range(w1.shape[1]):
        col = i1 + i
        if nm and i % nm[1] == 0:
            group = w1[:, i : i + nm[1]] ** 2 / d[i : i + nm[1]].unsqueeze(0) ** 2
            mask1[:, i : i + nm[1]] = lowest_n_of_m(group, *nm)
        if group_size != -1 and col % group_size == 0:
            part = w[:, col:col + group_size].clone()
            known = min(part.shape[1], w1.shape[1] - i)
            part[:, :known].masked_fill_(mask1[:, i:i + known], 0.0)
            grids.append(find_params(part, grid))
        scale, zero = grids[-1]
        q = quantize(w1[:, i:i + 1].masked_fill(mask1[:, i:i + 1], 0.0), scale, zero, grid.maxq)
        q = q.flatten()
        torch.div(w1[:, i] - q, d[i], out=err1[:, i])
        w1[:, i:].addr_(err1[:, i], hinv1[i, i:], alpha=-1)
        w1[:, i] = q


class SparseGPTConfig(SparsityConfig):
    """SparseGPT: OBS pruning with weight updates from the calibration Hessian."""

    method = "sparsegpt"

    blocksize: int = Field(BLOCKSIZE, ge=1, description="Columns solved per lazy block.")
    percdamp: float = Field(PERCDAMP, gt=0, lt=1, description="Dampening: this share of the "
                                                              "mean Hessian diagonal.")
    quantize: QuantGridConfig | None = Field(
        None, description="Also quantize the kept weights in the same solve (the reference's "
                          "wbits; it used per-channel asymmetric grids).")

    @field_validator("quantize", mode="before")
    @classmethod
    def _quantize_flag(cls, value: Any) -> Any:
        # `quantize: true` in YAML (or a bare --quantize) means the default grid
        if value is True:
            return QuantGridConfig()
        return None if value is False else value


@register_method(SparseGPTConfig)
class SparseGPT(SparsityMethod):
    needs = (Hessian,)
    config: SparseGPTConfig

    def __init__(self, config: SparseGPTConfig) -> None:
        super().__init__(config)
        self._errors: dict[str, dict[str, float]] = {}
        self._factors: dict[int, HessianFactor] = {}  # id(Hessian statistic) -> factor

    def prepare(self, model: nn.Module, adapter: ModelAdapter,
                context: PruneContext | None = None) -> None:
        quant = self.config.quantize
        if quant is not None:
            refuse_quantized(model)
            check_group_sizes(quant.group_size, {
                f"layers.{i}.{name}": p.in_features for i, layer in enumerate(adapter.layers)
                for name, p in adapter.linears(layer).items()}, quant.partial_groups)
        super().prepare(model, adapter, context)

    def prune_matrix(self, proj: Projection, stats: dict[str, Statistic],
                     sparsity: float | None, nm: tuple[int, int] | None) -> None:
        hessian = stats[Hessian.name]
        cfg, quant = self.config, self.config.quantize
        # q/k/v (and gate/up) share one Hessian object: factor it once for all of them
        if id(hessian) not in self._factors:
            with one_thread():
                self._factors[id(hessian)] = hessian_factor(hessian.sum, cfg.percdamp)
        factor = self._factors[id(hessian)]
        with one_thread():
            new, state, pruned = _solve(proj.weight, factor, sparsity, nm, cfg.blocksize,
                                        None if quant is None else quant.grid(),
                                        -1 if quant is None else quant.group_size)
        if state is not None:
            self._errors[proj.name] = {"output_error": output_error(proj.weight, new,
                                                                    hessian.sum)}
            set_quant_state(proj.module, state)
        proj.weight.copy_(new.to(proj.weight.dtype))
        # from the solve, not from the zeros: rounding sets some kept weights to 0 as well
        proj.record_pruned(pruned.to(proj.weight.device))

    def apply(self, index: int, projections: dict[str, Projection],
              stats: dict[str, dict[str, Statistic]]) -> LayerReport:
        try:
            report = super().apply(index, projections, stats)
        finally:
            self._factors.clear()
        for name, extra in self._errors.items():
            report.matrices[name].update(extra)
        self._errors.clear()
        return report

    def summary(self) -> dict[str, Any]:
        out = super().summary()
        if self.config.quantize is not None:
            out["quantize"] = self.config.quantize.to_dict()
        return out
