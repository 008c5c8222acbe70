"""Quantize into llama.cpp's block types (a preset such as q4_k_m), with secateur's rounding.

Each projection gets the ggml type llama.cpp's preset gives its tensor (attn_v and some
ffn_down in more bits, llama.cpp's fallbacks for rows that do not split into 256-weight
super-blocks). Its block grids are chosen as llama-quantize chooses them with an imatrix, the
imatrix being the diagonal of the calibration Hessian X^T X this step gathers; then the codes
are GPTQ's error-compensating solve onto those grids (`rounding: gptq`) or the nearest points
(`rounding: rtn`, which is llama-quantize --imatrix's own rounding). The model then holds the
dequantized weights, bit-equal to the blocks `secateur.formats.gguf` writes.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from secateur.config import MethodConfig, StepKind
from secateur.methods.base import LayerReport, LayerwiseMethod, PruneContext, register_method
from secateur.methods.masks import matrix_report
from secateur.methods.rtn import weight_error
from secateur.models.base import ModelAdapter, Projection
from secateur.quant.ggml import gptq_ggml, rtn_ggml, set_ggml_state
from secateur.quant.ggml_presets import PRESETS
from secateur.quant.gptq import BLOCKSIZE, PERCDAMP, output_error
from secateur.quant.grid import refuse_quantized
from secateur.stats import Hessian, Statistic


class GGUFConfig(MethodConfig):
    """Round into a llama.cpp preset's block types (saved as GGUF for llama.cpp)."""

    method: ClassVar[str] = "gguf"
    kind: ClassVar[StepKind] = "quantize"

    preset: str = Field("q4_k_m", description="llama.cpp preset: " + ", ".join(PRESETS) + ".")
    # rtn by default: on smollm2-135m GPTQ's codes lowered every layer's output error yet
    # raised perplexity (q4_0: 25.0 vs 22.5), all of it from v_proj/o_proj (see the notes of
    # bench/results/frontier_smollm2-135m_first_run.json); DWQ after rtn is what wins there
    rounding: Literal["gptq", "rtn"] = Field("rtn", description="rtn: the nearest codes on "
                                             "llama.cpp's grids (llama-quantize --imatrix); "
                                             "gptq: GPTQ's error-compensating codes.")
    act_order: bool = Field(False, description="GPTQ: fix every block's grid first, then "
                                               "solve columns by decreasing Hessian diagonal.")
    percdamp: float = Field(PERCDAMP, gt=0, lt=1, description="GPTQ dampening: this share of "
                                                              "the mean Hessian diagonal.")
    sequential: bool = Field(True, description="Feed each layer the quantized layers' outputs "
                                               "(else the dense activations).")

    @field_validator("preset")
    @classmethod
    def _known(cls, v: str) -> str:
        if v.lower() not in PRESETS:
            raise ValueError(f"unknown llama.cpp preset '{v}'; one of {', '.join(PRESETS)}")
        return v.lower()


@register_method(GGUFConfig)
class GGUFQuantize(LayerwiseMethod):
    needs = (Hessian,)
    config: GGUFConfig

    def prepare(self, model: nn.Module, adapter: ModelAdapter,
                context: PruneContext | None = None) -> None:
        # The file's tensor names and llama.cpp's per-tensor rules live with the GGUF writer;
        # read here once so each projection knows its type before it is rounded.
        from secateur.formats.gguf import gguf_tensor_types, hf_weight_names, read_gguf_layout

        refuse_quantized(model)
        layout = read_gguf_layout(model, "model")
        types = gguf_tensor_types(layout, self.config.preset, has_imatrix=True)
        names = hf_weight_names(layout)
        self.types = {names[k]: t for k, t in types.items() if k in names}
        self.prefix = adapter.layers_path

    def apply(self, index: int, projections: dict[str, Projection],
              stats: dict[str, dict[str, Statistic]]) -> LayerReport:
        report = LayerReport(index)
        cfg = self.config
        for name, proj in projections.items():
            ggml_type = self.types.get(f"{self.prefix}.{index}.{name}.weight", "F16")
            hessian = stats[name][Hessian.name]
            if ggml_type == "F16":  # llama.cpp keeps this one unquantized (row length)
                hessian.sum = torch.empty(0)
                continue
            before = proj.weight.detach().clone()
            if cfg.rounding == "gptq":
                new, state = gptq_ggml(before, hessian.sum, ggml_type, cfg.percdamp,
                                       BLOCKSIZE, name, cfg.act_order)
            else:
                new, state = rtn_ggml(before, ggml_type, torch.diag(hessian.sum), name)
            extra = {"output_error": output_error(before, new, hessian.sum)}
            state.imatrix = torch.diag(hessian.sum) / max(hessian.tokens, 1)
            state.imatrix_tokens = hessian.tokens
            hessian.sum = torch.empty(0)
            proj.weight.copy_(new.to(proj.weight.dtype))
            set_ggml_state(proj.module, state)
            report.matrices[name] = {**matrix_report(proj.weight),
                                     "weight_error": weight_error(before, new), **extra}
        return report

    def summary(self) -> dict[str, Any]:
        # from the plan, not from apply() calls: a resumed run applies only the later layers
        counts: dict[str, int] = {}
        for name, ggml_type in self.types.items():
            if name.startswith(f"{self.prefix}.") and ggml_type != "F16":
                counts[ggml_type] = counts.get(ggml_type, 0) + 1
        return {"preset": self.config.preset, "rounding": self.config.rounding,
                "act_order": self.config.act_order,
                "matrices_per_type": dict(sorted(counts.items()))}
