"""Magnitude pruning: the smallest |W| in each matrix (per matrix, as in the Wanda repo)."""

from __future__ import annotations

from secateur.methods.base import register_method
from secateur.methods.masks import lowest_n_of_m, lowest_per_matrix
from secateur.methods.sparsity import SparsityConfig, SparsityMethod, apply_mask
from secateur.models.base import Projection
from secateur.stats import Statistic


class MagnitudeConfig(SparsityConfig):
    """Magnitude: the smallest |W| per matrix (N:M within groups)."""

    method = "magnitude"


@register_method(MagnitudeConfig)
class Magnitude(SparsityMethod):

    def prune_matrix(self, proj: Projection, stats: dict[str, Statistic],
                     sparsity: float | None, nm: tuple[int, int] | None) -> None:
        score = proj.weight.abs()
        mask = lowest_n_of_m(score, *nm) if nm else lowest_per_matrix(score, sparsity)
        apply_mask(proj, mask)
