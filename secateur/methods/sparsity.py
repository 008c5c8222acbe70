"""Shared machinery of the mask methods: their config, targets, N:M checks, OWL's ratios."""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, ClassVar

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from secateur.config import Config, MethodConfig, StepKind
from secateur.errors import SecateurError
from secateur.methods.base import LayerReport, LayerwiseMethod, PruneContext
from secateur.methods.masks import check_nm_width, matrix_report, parse_nm
from secateur.methods.owl import outlier_ratio, owl_sparsities
from secateur.models.base import ModelAdapter, Projection
from secateur.models.mask import adopt_masks, clear_mask
from secateur.stats import ColumnSquares, Statistic


class OWLConfig(Config):
    """OWL's non-uniform layer sparsity (Yin et al., 2024); defaults are the paper's."""

    m: float = Field(5.0, gt=0, description="OWL: a score above M x the layer mean is an "
                                            "outlier.")
    lam: float = Field(0.08, ge=0, lt=1, description="OWL: per-layer sparsities spread over "
                                                     "target +- lambda.")


class SparsityConfig(MethodConfig):
    """Unstructured sparsity or an N:M pattern per projection, one layer at a time."""

    kind: ClassVar[StepKind] = "prune"

    sparsity: float | None = Field(None, ge=0, lt=1, description="Unstructured sparsity in "
                                                                 "[0, 1).")
    nm: str | None = Field(None, description="N:M semi-structured: keep N of every M "
                                             "consecutive input weights, e.g. 2:4.")
    owl: OWLConfig | None = Field(None, description="OWL non-uniform layer sparsity.")
    sequential: bool = Field(True, description="Feed each layer the pruned layers' outputs "
                                               "(else the dense activations).")
    error_report: bool = Field(False, description="Report each layer's relative output error "
                                                  "against the dense layer (costs part of a "
                                                  "layer pass; without it magnitude runs no "
                                                  "layer at all).")

    @field_validator("owl", mode="before")
    @classmethod
    def _owl_flag(cls, value: Any) -> Any:
        # `owl: true` in YAML (or --owl) means OWL with the paper's settings
        if isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        if value is True:
            return OWLConfig()
        return None if value is False else value

    @field_validator("nm")
    @classmethod
    def _nm_pattern(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_nm(value)
            except SecateurError as err:
                raise ValueError(str(err)) from None
        return value

    @model_validator(mode="after")
    def _one_target(self) -> SparsityConfig:
        if (self.sparsity is None) == (self.nm is None):
            raise ValueError(f"{self.method} takes exactly one of sparsity (e.g. 0.5) or nm "
                             "(e.g. 2:4)")
        if self.owl is not None and self.nm is not None:
            raise ValueError("owl sets per-layer unstructured sparsities; it does not combine "
                             "with nm")
        return self

    @property
    def pattern(self) -> tuple[int, int] | None:
        return parse_nm(self.nm) if self.nm else None


class SparsityMethod(LayerwiseMethod):
    """Prunes each projection of a layer to a target sparsity or an N:M pattern."""

    config: SparsityConfig
    shares_statistics = True  # statistics are read, never freed, until the layer is done
    splits_solves = True  # one matrix's mask never depends on another's

    def __init__(self, config: SparsityConfig) -> None:
        super().__init__(config)
        self.nm = config.pattern
        self.sparsity = config.sparsity
        self.layer_targets: list[float] | None = None
        self.outlier_ratios: list[float] | None = None
        # until prepare() says otherwise, a projection without a mask is read from its zeros
        self.derive_masks = True
        self.records_masks = True

    def prepare(self, model: nn.Module, adapter: ModelAdapter,
                context: PruneContext | None = None) -> None:
        if self.nm:
            n, m = self.nm
            for name, proj in adapter.linears(adapter.layers[0]).items():
                check_nm_width(n, m, proj.in_features, name)
        # A streamed layer is written out and dropped once pruned: no later step could read
        # its mask, and the layer checkpoint that becomes its output shard must hold none.
        self.records_masks = adapter.layers_in_memory()
        if self.records_masks:
            # every projection holds its mask from the start, not only once pruned: a
            # resumed run loads finished layers (masks included) strictly by key
            self.derive_masks = adapter.adopt_masks()
        owl = self.config.owl
        if owl is None:
            return
        if context is None or context.layerwise_stats is None:
            raise SecateurError("owl needs calibration data to measure outliers")
        ratios: list[float] = []

        def on_layer(index: int, projections: dict[str, Projection], stats) -> None:
            scores = [p.weight.abs() * stats[name][ColumnSquares.name].norms
                      for name, p in projections.items()]
            ratios.append(outlier_ratio(scores, owl.m))

        context.layerwise_stats((ColumnSquares,), on_layer)
        self.outlier_ratios = ratios
        self.layer_targets = owl_sparsities(ratios, self.sparsity, owl.lam)

    def target(self, index: int) -> float | None:
        return self.layer_targets[index] if self.layer_targets else self.sparsity

    @abstractmethod
    def prune_matrix(self, proj: Projection, stats: dict[str, Statistic],
                     sparsity: float | None, nm: tuple[int, int] | None) -> None:
        """Zero weights of `proj.weight` in place (and update the rest, for SparseGPT), and
        record the pruned ones (`Projection.record_pruned`)."""

    def apply(self, index: int, projections: dict[str, Projection],
              stats: dict[str, dict[str, Statistic]]) -> LayerReport:
        target = self.target(index)
        report = LayerReport(index, target=target)
        for name, proj in projections.items():
            if self.nm:
                check_nm_width(*self.nm, proj.in_features, name)
            if self.records_masks:
                adopt_masks([proj.module], self.derive_masks)
            self.prune_matrix(proj, stats[name], target, self.nm)
            if not self.records_masks:
                clear_mask(proj.module)
            report.matrices[name] = matrix_report(proj.weight)
        return report

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sparsity": self.sparsity, "nm": self.config.nm,
                               "owl": self.config.owl is not None}
        if self.config.owl is not None:
            out["owl_m"] = self.config.owl.m
            out["owl_lambda"] = self.config.owl.lam
            out["owl_outlier_ratios"] = self.outlier_ratios
            out["owl_layer_sparsities"] = self.layer_targets
        return out


def apply_mask(proj: Projection, mask: torch.Tensor) -> None:
    """Zero the weights where `mask` (`(out, in)`) is True, and record them as pruned."""
    proj.weight.masked_fill_(mask, 0.0)
    proj.record_pruned(mask)
