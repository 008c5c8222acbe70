"""Wanda (Sun et al., 2024): score |W_ij| * ||X_j||_2, compared within each output row."""

from __future__ import annotations

from secateur.methods.base import register_method
from secateur.methods.masks import lowest_n_of_m, lowest_per_row
from secateur.methods.sparsity import SparsityConfig, SparsityMethod, apply_mask
from secateur.models.base import Projection
from secateur.stats import ColumnSquares, Statistic


class WandaConfig(SparsityConfig):
    """Wanda: |W| x ||X|| per output row (N:M within groups)."""

    method = "wanda"


@register_method(WandaConfig)
class Wanda(SparsityMethod):
    needs = (ColumnSquares,)

    def prune_matrix(self, proj: Projection, stats: dict[str, Statistic],
                     sparsity: float | None, nm: tuple[int, int] | None) -> None:
        score = proj.weight.abs() * stats[ColumnSquares.name].norms.unsqueeze(0)
        mask = lowest_n_of_m(score, *nm) if nm else lowest_per_row(score, sparsity)
        apply_mask(proj, mask)
