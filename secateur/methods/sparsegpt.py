"""SparseGPT (Frantar & Alistarh, 2023): OBS pruning with lazy block updates.

Follows the reference `fasterprune`: Hessian H = X^T X, dampening of 1% of its mean diagonal,
the upper Cholesky factor of H^-1, columns visited in blocks of 128; inside a block, the mask
is chosen from w^2 / [H^-1]_jj^2 (per block for unstructured sparsity, every M columns for
N:M) and each pruned weight's error is spread over the columns not yet visited.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

from secateur.errors import SecateurError
from secateur.methods.base import register_method
from secateur.methods.masks import lowest_n_of_m, lowest_per_matrix
from secateur.methods.sparsity import SparsityMethod
from secateur.models.base import Projection
from secateur.stats import Hessian, Statistic

BLOCKSIZE = 128
PERCDAMP = 0.01


def inverse_hessian_factor(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp*I)^-1, dampening raised tenfold if H is singular."""
    damp = percdamp * torch.mean(torch.diag(h))
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    for _ in range(4):
        try:
            lower = torch.linalg.cholesky(h + damp * eye)
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
        except torch.linalg.LinAlgError:
            damp = damp * 10
    raise SecateurError("SparseGPT: the calibration Hessian is not positive definite even with "
                        "heavy dampening; give more calibration windows (--nsamples)")


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """The solve is thousands of tiny column ops plus one small Cholesky; intra-op threads
    only add sync cost there (2-4x slower with 2 threads on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
    with _one_thread():
        return _solve(weight, hessian, sparsity, nm, blocksize, percdamp)


def _solve(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float | None,
    nm: tuple[int, int] | None,
    blocksize: int,
    percdamp: float,
) -> torch.Tensor:
    w = weight.detach().clone().float()
    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    hinv = inverse_hessian_factor(h, percdamp)
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
        w[:, i2:] -= err1.matmul(hinv[i1:i2, i2:])
    return w


@register_method
class SparseGPT(SparsityMethod):
    name = "sparsegpt"
    needs = (Hessian,)

    def prune_matrix(self, proj: Projection, stats: dict[str, Statistic],
                     sparsity: float | None, nm: tuple[int, int] | None) -> None:
        hessian = stats[Hessian.name]
        new = sparsegpt_prune(proj.weight, hessian.sum, sparsity, nm)
        proj.weight.copy_(new.to(proj.weight.dtype))
        hessian.sum = torch.empty(0)  # a Hessian per matrix adds up; free it as soon as used
