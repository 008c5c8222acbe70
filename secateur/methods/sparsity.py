"""Shared machinery of the mask methods: targets, N:M checks, OWL's per-layer ratios."""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
from torch import nn

from secateur.errors import SecateurError
from secateur.methods.base import LayerReport, LayerwiseMethod, PruneContext, PruneOptions
from secateur.methods.masks import check_nm_width, check_sparsity, matrix_report, parse_nm
from secateur.methods.owl import outlier_ratio, owl_sparsities
from secateur.models.base import ModelAdapter, Projection
from secateur.stats import ColumnSquares, Statistic


class SparsityMethod(LayerwiseMethod):
    """Prunes each projection of a layer to a target sparsity or an N:M pattern."""

    def __init__(self, options: PruneOptions) -> None:
        super().__init__(options)
        if (options.sparsity is None) == (options.nm is None):
            raise SecateurError(f"--method {options.method} takes exactly one of --sparsity R "
                                "or --nm N:M")
        self.nm = parse_nm(options.nm) if options.nm else None
        self.sparsity = check_sparsity(options.sparsity) if options.sparsity is not None else None
        if options.owl and self.nm:
            raise SecateurError("--owl sets per-layer unstructured ratios; it does not combine "
                                "with --nm")
        self.layer_targets: list[float] | None = None
        self.outlier_ratios: list[float] | None = None

    def prepare(self, model: nn.Module, adapter: ModelAdapter,
                context: PruneContext | None = None) -> None:
        if self.nm:
            n, m = self.nm
            for name, proj in adapter.linears(adapter.layers[0]).items():
                check_nm_width(n, m, proj.in_features, name)
        if not self.options.owl:
            return
        if context is None or context.layerwise_stats is None:
            raise SecateurError("--owl needs calibration data to measure outliers")
        ratios: list[float] = []

        def on_layer(index: int, projections: dict[str, Projection], stats) -> None:
            scores = [p.weight.abs() * stats[name][ColumnSquares.name].norms
                      for name, p in projections.items()]
            ratios.append(outlier_ratio(scores, self.options.owl_m))

        context.layerwise_stats((ColumnSquares,), on_layer)
        self.outlier_ratios = ratios
        self.layer_targets = owl_sparsities(ratios, self.sparsity, self.options.owl_lambda)

    def target(self, index: int) -> float | None:
        return self.layer_targets[index] if self.layer_targets else self.sparsity

    @abstractmethod
    def prune_matrix(self, proj: Projection, stats: dict[str, Statistic],
                     sparsity: float | None, nm: tuple[int, int] | None) -> None:
        """Zero weights of `proj.weight` in place (and update the rest, for SparseGPT)."""

    def apply(self, index: int, projections: dict[str, Projection],
              stats: dict[str, dict[str, Statistic]]) -> LayerReport:
        target = self.target(index)
        report = LayerReport(index, target=target)
        for name, proj in projections.items():
            if self.nm:
                check_nm_width(*self.nm, proj.in_features, name)
            self.prune_matrix(proj, stats[name], target, self.nm)
            report.matrices[name] = matrix_report(proj.weight)
        return report

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sparsity": self.sparsity, "nm": self.options.nm,
                               "owl": self.options.owl}
        if self.options.owl:
            out["owl_m"] = self.options.owl_m
            out["owl_lambda"] = self.options.owl_lambda
            out["owl_outlier_ratios"] = self.outlier_ratios
            out["owl_layer_sparsities"] = self.layer_targets
        return out


def apply_mask(weight: torch.Tensor, mask: torch.Tensor) -> None:
    weight.masked_fill_(mask, 0.0)
