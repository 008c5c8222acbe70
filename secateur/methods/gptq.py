"""GPTQ as a layer-wise method: each projection quantized on the Hessian of its inputs.

Shares the X^T X statistic with SparseGPT. Pruned weights (the mask a pruning method recorded,
`secateur.models.mask`; the exact zeros of a model read from disk) stay exactly zero unless
`keep_zeros` is off.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field, model_validator

from secateur.methods.base import register_method
from secateur.methods.rtn import QuantizeConfig, QuantizeMethod
from secateur.models.base import Projection
from secateur.quant.gptq import BLOCKSIZE, PERCDAMP, gptq_quantize, output_error
from secateur.quant.state import QuantState
from secateur.stats import Hessian, Statistic


class GPTQConfig(QuantizeConfig):
    """GPTQ: quantize column by column, compensating the rounding error through H^-1."""

    method: ClassVar[str] = "gptq"

    act_order: bool = Field(False, description="Quantize columns by decreasing Hessian "
                                               "diagonal (desc_act); with groups, each column's "
                                               "group is stored in g_idx.")
    static_groups: bool = Field(False, description="Fix every group's grid on the original "
                                                   "weights before the solve, so act-order "
                                                   "needs no g_idx (needs group_size > 0).")
    true_sequential: bool = Field(False, description="Quantize q/k/v, then o, then gate/up, "
                                                     "then down, each on inputs that see the "
                                                     "earlier ones quantized.")
    percdamp: float = Field(PERCDAMP, gt=0, lt=1, description="Dampening: this share of the "
                                                              "mean Hessian diagonal (raised "
                                                              "tenfold while H stays singular).")
    blocksize: int = Field(BLOCKSIZE, ge=1, description="Columns solved per lazy block.")
    keep_zeros: bool = Field(True, description="Pruned weights stay exactly zero; the others "
                                               "absorb their error.")
    sequential: bool = Field(True, description="Feed each layer the quantized layers' outputs "
                                               "(else the dense activations).")

    @model_validator(mode="after")
    def _static_needs_groups(self) -> GPTQConfig:
        if self.static_groups and self.group_size == -1:
            raise ValueError("static_groups fixes a grid per group of columns; it needs "
                             "group_size > 0")
        return self


@register_method(GPTQConfig)
class GPTQ(QuantizeMethod):
    needs = (Hessian,)
    config: GPTQConfig

    def quantize_matrix(self, proj: Projection, stats: dict[str, Statistic]
                        ) -> tuple[torch.Tensor, QuantState, dict[str, float]]:
        hessian = stats[Hessian.name]
        cfg = self.config
        # the recorded mask: a kept weight that happens to be 0 is quantized like any other
        mask = proj.pruned() if cfg.keep_zeros else None
        new, state = gptq_quantize(proj.weight, hessian.sum, cfg.grid(), cfg.group_size,
                                   cfg.act_order, cfg.static_groups, cfg.blocksize,
                                   cfg.percdamp, mask)
        if not cfg.keep_zeros:  # the pruned weights took values: nothing is pruned any more
            proj.set_kept(torch.ones_like(new, dtype=torch.bool))
        extra = {"output_error": output_error(proj.weight, new, hessian.sum)}
        hessian.sum = torch.empty(0)  # a Hessian per matrix adds up; free it as soon as used
        return new, state, extra

    def summary(self) -> dict[str, Any]:
        cfg = self.config
        return {**super().summary(), "act_order": cfg.act_order,
                "static_groups": cfg.static_groups, "keep_zeros": cfg.keep_zeros}
