"""Choosing which weights to prune from a score: per matrix, per row, or N:M groups."""

from __future__ import annotations

import torch

from secateur.errors import SecateurError


def parse_nm(spec: str) -> tuple[int, int]:
    """'2:4' -> (2, 4): keep N of every M consecutive input weights (NVIDIA's convention)."""
    try:
        n_str, m_str = spec.split(":")
        n, m = int(n_str), int(m_str)
    except ValueError:
        raise SecateurError(f"--nm takes N:M with whole numbers, like 2:4; got '{spec}'") from None
    if not 0 < n < m:
        raise SecateurError(f"--nm {spec}: need 0 < N < M (N weights kept of every M)")
    return n, m


def check_nm_width(n: int, m: int, in_features: int, name: str) -> None:
    if in_features % m:
        raise SecateurError(f"--nm {n}:{m}: M={m} does not divide the input width "
                            f"{in_features} of {name}; pick an M that divides it")


def kth_smallest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest value (1-based) of a 1-D tensor: exactly `flat.kthvalue(k)`, in a few
    vectorised passes for large tensors.

    A strided sample brackets the answer; only the values inside the bracket are selected
    from. The sample decides the speed, never the result (a bracket that misses falls back)."""
    n = flat.numel()
    if n < 2**16:
        return flat.kthvalue(k).values
    sample = flat[:: n // 4096].sort().values
    at = k * sample.numel() // n
    lo = sample[max(at - 64, 0)]
    hi = sample[min(at + 64, sample.numel() - 1)]
    below = int(torch.count_nonzero(flat < lo))
    inside = flat[(flat >= lo) & (flat <= hi)]
    if below < k <= below + inside.numel():
        return inside.kthvalue(k - below).values
    return flat.kthvalue(k).values


def lowest_per_matrix(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Mask (True = prune) of exactly floor(numel * sparsity) lowest scores in the matrix.

    The same mask as the first k of a stable argsort (ties at the threshold go to the lowest
    flat indices), found by selection instead of a full sort."""
    k = int(score.numel() * sparsity)
    if not k:
        return torch.zeros_like(score, dtype=torch.bool)
    flat = score.reshape(-1)
    threshold = kth_smallest(flat, k)
    mask = flat < threshold
    ties = flat == threshold
    need = k - int(torch.count_nonzero(mask))
    if need == int(torch.count_nonzero(ties)):
        mask |= ties
    else:
        mask[ties.nonzero().squeeze(1)[:need]] = True
    return mask.view_as(score)


def lowest_per_row(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Mask of exactly floor(in_features * sparsity) lowest scores in every output row.

    The same mask as the first k of a stable argsort of each row, found by selection."""
    k = int(score.shape[1] * sparsity)
    if not k:
        return torch.zeros_like(score, dtype=torch.bool)
    threshold = score.kthvalue(k, dim=1, keepdim=True).values
    mask = score < threshold
    ties = score == threshold
    need = k - mask.sum(1, keepdim=True)
    # Rows whose ties at the threshold are all needed (the usual case with real-valued
    # scores) take them all; the others take their first `need` ties by column.
    crowded = (ties.sum(1, keepdim=True) != need).squeeze(1).nonzero().squeeze(1)
    mask |= ties
    if crowded.numel():
        rows = ties[crowded]
        rank = rows.to(torch.int32).cumsum(1, dtype=torch.int32)
        mask[crowded] = (score[crowded] < threshold[crowded]) | (
            rows & (rank <= need[crowded].to(torch.int32)))
    return mask


def lowest_n_of_m(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Mask pruning the M-N lowest scores in every group of M consecutive input columns."""
    rows, cols = score.shape
    groups = score.reshape(rows, cols // m, m)
    idx = torch.topk(groups, m - n, dim=-1, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.reshape(rows, cols)


def matrix_report(weight: torch.Tensor) -> dict[str, float]:
    zeros = (weight == 0).sum().item()
    return {"sparsity": zeros / weight.numel(), "numel": weight.numel()}
