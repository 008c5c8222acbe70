"""W8A8: int8 weights per output channel and int8 activations per token, with optional
SmoothQuant smoothing (Xiao et al., 2023) from calibration activation maxima.

Weights: symmetric int8 per output row, s = max|W_i| / 127 (codes q - 128 in [-127, 127]).
Activations: quantized per token at run time (s_x = max|x| / 127); `mark_w8a8` makes the
dense model in memory simulate that rounding, and the int8 runtime runs it on `torch._int_mm`.

SmoothQuant moves the difficulty of activation outliers into the weights: per input column j
of the linears reading one norm's output, s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha); X is
divided by s (folded into the norm's weight, so it costs nothing at run time) and W's columns
multiplied by s, which leaves the layer's function unchanged before quantization. As in the
reference, only the linears fed by a norm are smoothed (q/k/v and gate/up or fc1): o_proj and
down_proj read activations that no foldable scale precedes.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from secateur.config import MethodConfig, StepKind
from secateur.errors import SecateurError
from secateur.methods.base import LayerReport, LayerwiseMethod, PruneContext, register_method
from secateur.models.base import ModelAdapter, Projection
from secateur.quant.state import QuantState, is_quantized, set_quant_state
from secateur.runtime.int8 import mark_w8a8
from secateur.stats import Statistic
from secateur.stats.absmax import ColumnAbsMax


class W8A8Config(MethodConfig):
    """int8 weights (per channel) and int8 activations (per token, dynamic), SmoothQuant."""

    method: ClassVar[str] = "w8a8"
    kind: ClassVar[StepKind] = "quantize"

    smoothquant_alpha: float | None = Field(
        0.5, ge=0, le=1, description="SmoothQuant migration strength (0.5: the paper's "
                                     "default); None turns smoothing off.")
    sequential: bool = Field(True, description="Feed each layer the quantized layers' "
                                               "outputs (else the dense activations).")


def int8_per_channel(weight: torch.Tensor) -> QuantState:
    """The symmetric int8 grid of each output row: scale max|W_i| / 127, zero point 128."""
    scale = (weight.float().abs().amax(1, keepdim=True) / 127).clamp_min(1e-12)
    return QuantState(8, -1, True, scale, torch.full_like(scale, 128.0))


def smoothing_scales(act_max: torch.Tensor, weights: list[torch.Tensor],
                     alpha: float) -> torch.Tensor:
    w_max = torch.cat([w.float().abs() for w in weights]).amax(0)
    s = act_max.float().pow(alpha) / w_max.pow(1 - alpha)
    # a column no token or no weight touches has nothing to migrate
    dead = (act_max <= 0) | (w_max <= 0) | ~torch.isfinite(s)
    return torch.where(dead, torch.ones_like(s), s.clamp_min(1e-5))


@torch.no_grad()
def fold_into_norm(norm: nn.Module, s: torch.Tensor, name: str, weight_offset: float = 0.0
                   ) -> None:
    """Make `norm`'s output x / s, for a norm computing x_hat * (weight_offset + weight)
    (+ bias): the family's `ModelAdapter.norm_weight_offset`."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.shape != s.shape:
        raise SecateurError(f"SmoothQuant cannot fold scales into '{name}' "
                            f"({type(norm).__name__}): use smoothquant_alpha=None")
    if weight_offset:
        norm.weight.copy_((weight_offset + norm.weight.float()) / s - weight_offset)
        return
    norm.weight.div_(s.to(norm.weight.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(s.to(norm.bias.dtype))


@register_method(W8A8Config)
class W8A8(LayerwiseMethod):
    needs: ClassVar[tuple[type[Statistic], ...]] = (ColumnAbsMax,)
    config: W8A8Config

    def __init__(self, config: W8A8Config) -> None:
        super().__init__(config)
        self.adapter: ModelAdapter | None = None
        self.smoothing: list[dict[str, float]] = []

    def prepare(self, model: nn.Module, adapter: ModelAdapter,
                context: PruneContext | None = None) -> None:
        if adapter.transposed_weights:
            raise SecateurError("w8a8 quantizes nn.Linear weights; this family's Conv1D "
                                "projections are not supported")
        if is_quantized(model):
            raise SecateurError("the model is already quantized: w8a8 starts from a float "
                                "model (load the unquantized one)")
        self.adapter = adapter

    @torch.no_grad()
    def _smooth(self, layer: nn.Module, index: int,
                stats: dict[str, dict[str, Statistic]]) -> None:
        assert self.adapter is not None
        adapter, alpha = self.adapter, self.config.smoothquant_alpha
        for norm_path, inputs in ((adapter.attn_norm, adapter.attention_inputs(layer)),
                                  (adapter.mlp_norm, adapter.mlp_inputs(layer))):
            act_max = torch.stack([stats[p.name][ColumnAbsMax.name].max for p in inputs])
            s = smoothing_scales(act_max.amax(0), [p.weight for p in inputs], alpha)
            fold_into_norm(layer.get_submodule(norm_path), s, f"layer {index} {norm_path}",
                           adapter.norm_weight_offset)
            for p in inputs:
                p.weight.mul_(s.to(p.weight.dtype))
            self.smoothing.append({"layer": index, "norm": norm_path,
                                   "max_scale": float(s.max()), "min_scale": float(s.min())})

    @torch.no_grad()
    def apply(self, index: int, projections: dict[str, Projection],
              stats: dict[str, dict[str, Statistic]]) -> LayerReport:
        if self.adapter is None:
            raise SecateurError("w8a8: prepare() must run before apply()")
        layer = self.adapter.layers[index]
        if self.config.smoothquant_alpha is not None:
            self._smooth(layer, index, stats)
        report = LayerReport(index)
        for name, proj in projections.items():
            w = proj.weight
            state = int8_per_channel(w)
            dequant = state.dequantize(state.codes(w)).to(w.dtype)
            error = float((dequant - w).float().norm() / w.float().norm().clamp_min(1e-12))
            w.copy_(dequant)
            set_quant_state(proj.module, state)
            mark_w8a8(proj.module)
            act_max = stats[name][ColumnAbsMax.name].max
            report.matrices[name] = {"weight_relative_error": error,
                                     "activation_absmax": float(act_max.max())}
        return report

    def summary(self) -> dict[str, Any]:
        return {"weights": "int8, symmetric, per output channel",
                "activations": "int8, symmetric, per token, dynamic (at run time)",
                "smoothquant_alpha": self.config.smoothquant_alpha,
                "smoothing": self.smoothing}
