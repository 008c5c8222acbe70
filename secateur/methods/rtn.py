"""RTN: round every weight to the nearest point of its group's grid (the quantization baseline).

Also the base of the quantizing layer-wise methods: before any work they refuse an already
quantized model and a group size that does not divide every projection's input width; after
each matrix they leave its grid on the linear (`secateur.quant.state`) for savers and runtimes.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from secateur.config import MethodConfig, StepKind
from secateur.methods.base import LayerReport, LayerwiseMethod, PruneContext, register_method
from secateur.methods.masks import matrix_report
from secateur.models.base import ModelAdapter, Projection
from secateur.models.mask import adopt_masks, clear_mask
from secateur.quant.grid import QuantGridConfig, check_group_sizes, refuse_quantized, rtn
from secateur.quant.state import QuantState, set_quant_state
from secateur.stats import Statistic


class QuantizeConfig(QuantGridConfig, MethodConfig):
    """A layer-wise quantization step: the grid's settings plus the method's own."""

    kind: ClassVar[StepKind] = "quantize"


class RTNConfig(QuantizeConfig):
    """RTN: round to nearest on the grid; needs no calibration statistics."""

    method: ClassVar[str] = "rtn"

    # Off by default: rounding reads the weights alone, so without the report no layer runs
    # and no calibration pass is made (seconds, not minutes); each matrix's weight error is
    # reported either way.
    error_report: bool = Field(False, description="Also report each layer's relative output "
                                                  "error against the dense layer (runs the "
                                                  "calibration windows through every layer).")


def weight_error(before: torch.Tensor, after: torch.Tensor) -> float:
    """||W - Q||_F / ||W||_F."""
    w = before.float()
    norm = w.norm()
    return float((w - after.float()).norm() / norm) if norm > 0 else 0.0


class QuantizeMethod(LayerwiseMethod):
    """Quantizes each projection of a layer; subclasses say how (`quantize_matrix`)."""

    config: QuantizeConfig
    splits_solves = True  # each matrix is quantized on its own statistics alone
    # until prepare() says otherwise, a projection without a mask is read from its zeros
    derive_masks = True
    records_masks = True

    def prepare(self, model: nn.Module, adapter: ModelAdapter,
                context: PruneContext | None = None) -> None:
        refuse_quantized(model)
        check_group_sizes(self.config.group_size, {
            f"layers.{i}.{name}": p.in_features for i, layer in enumerate(adapter.layers)
            for name, p in adapter.linears(layer).items()}, self.config.partial_groups)
        # Masks are recorded before rounding adds zeros of its own, which later steps
        # (recovery, keep_zeros) must not take for pruned weights; a streamed layer is
        # written out and dropped at once (see SparsityMethod.prepare), so it keeps none.
        self.records_masks = adapter.layers_in_memory()
        if self.records_masks:
            self.derive_masks = adapter.adopt_masks()

    @abstractmethod
    def quantize_matrix(self, proj: Projection, stats: dict[str, Statistic]
                        ) -> tuple[torch.Tensor, QuantState, dict[str, float]]:
        """The dequantized weight, its grid and extra per-matrix numbers."""

    def apply(self, index: int, projections: dict[str, Projection],
              stats: dict[str, dict[str, Statistic]]) -> LayerReport:
        report = LayerReport(index)
        for name, proj in projections.items():
            if self.records_masks:
                adopt_masks([proj.module], self.derive_masks)
            new, state, extra = self.quantize_matrix(proj, stats[name])
            if not self.records_masks:
                clear_mask(proj.module)
            error = weight_error(proj.weight, new)
            proj.weight.copy_(new.to(proj.weight.dtype))
            set_quant_state(proj.module, state)
            report.matrices[name] = {**matrix_report(proj.weight), "weight_error": error,
                                     **extra}
        return report

    def summary(self) -> dict[str, Any]:
        return {"bits": self.config.bits, "group_size": self.config.group_size,
                "symmetric": self.config.symmetric,
                "partial_groups": self.config.partial_groups}


@register_method(RTNConfig)
class RTN(QuantizeMethod):
    needs = ()
    config: RTNConfig

    def quantize_matrix(self, proj: Projection, stats: dict[str, Statistic]
                        ) -> tuple[torch.Tensor, QuantState, dict[str, float]]:
        new, state = rtn(proj.weight, self.config.grid(), self.config.group_size)
        return new, state, {}
