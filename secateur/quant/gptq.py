"""GPTQ (Frantar et al., 2023): quantize one column at a time, spreading each column's rounding
error over the columns not yet quantized through the inverse Hessian of the layer's inputs.

Follows the reference `GPTQ.fasterquant` (IST-DASLab/gptq): dead inputs (diag H = 0) get
H_jj = 1 and a zero weight; dampening of `percdamp` of the mean diagonal (raised tenfold while
the Cholesky factorisation fails, where the reference would stop); the upper Cholesky factor of
H^-1; lazy updates in blocks of `blocksize` columns. Groups: a group's grid is found when the solve
reaches its first column, from the group's current (already updated) weights as they stood at
the start of the block, as the reference does. With act-order, columns are visited by
decreasing H_jj and groups are formed in that order, so each column's group is recorded in
`g_idx`; with static groups, every group's grid is fixed on the original weights before the
solve and groups stay contiguous in the original order (AutoGPTQ/GPTQModel's `static_groups`).

`mask` marks weights that must stay exactly zero (a pruned model): they are quantized to 0,
which every grid holds, and their error is spread like any other column's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from secateur.errors import SecateurError
from secateur.quant.grid import Grid, find_params, quantize
from secateur.quant.state import QuantState

BLOCKSIZE = 128
PERCDAMP = 0.01


def inverse_hessian_factor(h: torch.Tensor, percdamp: float, who: str = "the solve"
                           ) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp*I)^-1, dampening raised tenfold if H is singular."""
    damp = percdamp * torch.mean(torch.diag(h))
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for _ in range(4):
        try:
            lower = torch.linalg.cholesky(h + damp * eye)
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
        except torch.linalg.LinAlgError:
            damp = damp * 10
    raise SecateurError(f"{who}: the calibration Hessian is not positive definite even with "
                        "heavy dampening; give more calibration windows (--nsamples)")


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """The solve is thousands of tiny column ops plus one small Cholesky; intra-op threads
    only add sync cost there (2-4x slower with 2 threads on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    grid: Grid,
    group_size: int = -1,
    act_order: bool = False,
    static_groups: bool = False,
    blocksize: int = BLOCKSIZE,
    percdamp: float = PERCDAMP,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, QuantState]:
    """The dequantized weight (out, in) float32 and its grid; `weight` is left as it was."""
    if static_groups and group_size == -1:
        raise SecateurError("static_groups fixes the grid of each group of columns; it needs "
                            "group_size > 0")
    with one_thread():
        return _solve(weight, hessian, grid, group_size, act_order, static_groups, blocksize,
                      percdamp, mask)


def _solve(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    grid: Grid,
    group_size: int,
    act_order: bool,
    static_groups: bool,
    blocksize: int,
    percdamp: float,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, QuantState]:
    w = weight.detach().clone().float()
    rows, cols = w.shape
    maxq = grid.maxq
    if mask is not None:
        mask = mask.bool()
        w[mask] = 0
    scale = zero = None
    if group_size == -1:
        # The reference finds a per-channel grid before zeroing dead columns.
        scale, zero = find_params(w, grid)
    h = hessian.detach().clone().float()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    static: list[tuple[torch.Tensor, torch.Tensor]] = []
    if static_groups:
        static = [find_params(w[:, i:i + group_size], grid) for i in range(0, cols, group_size)]
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True, stable=True)
        w = w[:, perm]
        h = h[perm][:, perm]
        if mask is not None:
            mask = mask[:, perm]
    hinv = inverse_hessian_factor(h, percdamp, "GPTQ")
    del h
    q = torch.zeros_like(w)
    dynamic: list[tuple[torch.Tensor, torch.Tensor]] = []
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if group_size != -1:
                if static_groups:
                    orig = int(perm[col]) if perm is not None else col
                    scale, zero = static[orig // group_size]
                elif col % group_size == 0:
                    part = w[:, col:col + group_size]
                    if mask is not None:
                        # the grid need only hold the weights that survive
                        part = part.masked_fill(mask[:, col:col + group_size], 0.0)
                    scale, zero = find_params(part, grid)
                    dynamic.append((scale, zero))
            qc = quantize(w1[:, i:i + 1], scale, zero, maxq).flatten()
            if mask is not None:
                qc.masked_fill_(mask[:, col], 0.0)
            q[:, col] = qc
            torch.div(w1[:, i] - qc, hinv1[i, i], out=err1[:, i])
            w1[:, i:].addr_(err1[:, i], hinv1[i, i:], alpha=-1)
        w[:, i2:] -= err1.matmul(hinv[i1:i2, i2:])
    g_idx = None
    actorder = None
    if group_size == -1:
        scales, zeros = scale, zero
    elif static_groups:
        scales = torch.cat([s for s, _ in static], 1)
        zeros = torch.cat([z for _, z in static], 1)
        actorder = "weight" if act_order else None
    else:
        scales = torch.cat([s for s, _ in dynamic], 1)
        zeros = torch.cat([z for _, z in dynamic], 1)
        if act_order:
            # column perm[j] was visited j-th, in group j // group_size
            g_idx = torch.empty(cols, dtype=torch.int32)
            g_idx[perm.cpu()] = (torch.arange(cols) // group_size).to(torch.int32)
            actorder = "group"
    if perm is not None:
        q = q[:, torch.argsort(perm)]
    # the grid lives on the CPU, where the engine leaves every layer
    state = QuantState(grid.bits, group_size, grid.symmetric, scales.cpu().contiguous(),
                       zeros.cpu().contiguous(), g_idx, actorder)
    return q, state


def output_error(before: torch.Tensor, after: torch.Tensor, hessian: torch.Tensor) -> float:
    """||(W - Q) X|| / ||W X|| from H = X^T X: the layer-wise error the solve minimises."""
    w = before.float()
    d = w - after.float()
    num = ((d @ hessian) * d).sum()
    den = ((w @ hessian) * w).sum()
    return float((num.clamp(min=0) / den).sqrt()) if den > 0 else 0.0
