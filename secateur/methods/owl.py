"""OWL (Yin et al., 2024): non-uniform layer sparsity from each layer's share of outliers.

A layer's outlier ratio is the share of its Wanda scores |W_ij| * ||X_j|| above `m` times the
layer's mean score; layers with more outliers keep more weights. Ratios are min-max scaled
to [0, 2*lambda], centred so the mean density equals 1 - target (the reference code's rule).
"""

from __future__ import annotations

import torch

from secateur.errors import SecateurError


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    flat = torch.cat([s.flatten() for s in scores])
    return float((flat > m * flat.mean()).float().mean())


def owl_sparsities(ratios: list[float], target: float, lam: float) -> list[float]:
    if not 0 <= lam < 1:
        raise SecateurError(f"OWL lambda must be in [0, 1), got {lam}")
    r = torch.tensor(ratios, dtype=torch.float64)
    spread = r.max() - r.min()
    scaled = (r - r.min()) / spread * (2 * lam) if spread > 0 else torch.zeros_like(r)
    density = scaled - scaled.mean() + (1 - target)
    sparsities = (1 - density).clamp(0.0, 0.99)
    return sparsities.tolist()
