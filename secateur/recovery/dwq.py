"""Distilled weight quantization (DWQ, as in mlx-lm PR #279): after a quantize step, the
integer codes stay frozen and the grids they sit on are learnt by distillation from the
unquantized teacher.

Each quantized linear's weight becomes a function of its frozen codes and a few trainable
tensors (a `torch.nn.utils.parametrize` parametrization, so the model and its adapter keep
their modules): `s * (q - zero) + b` per sub-block for ggml types (`GGMLState`), `(q - zero) *
scale` per group for compressed-tensors grids (`QuantState`). The scales are learnt as a
relative change `s0 * (1 + r)` and the minimums as a shift in units of the block's step
`m0 + d0 * r`, so one learning rate suits every layer whatever its weights' magnitude. Norm
weights and biases and the quantized linears' biases may be trained too. The loss is the
divergence from the teacher's next-token distribution on packed text, through the same
objective, trainer and checkpoints as `secateur distill`.

When training ends, the learnt values are projected onto what the format stores: ggml's fp16
`d`/`m` (Q4_0, Q4_1, Q5_x, Q8_0) or the fp16 super-block factors `d` and `dmin` of K-types
(their 6-bit sub-block scales stay as they were, as do Q6_K's int8 ones); compressed-tensors
keeps float32 scales and its integer zero points are never trained. The weights in memory are
then rebuilt from the projected fields with the very float32 operations the rounding used, so
they equal the packed blocks bit for bit and the saved file keeps its types and size.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn.utils import parametrize

from secateur.config import StepKind
from secateur.errors import SecateurError
from secateur.methods.base import ModelMethod, PruneContext, register_method
from secateur.models.loading import Loaded
from secateur.quant.ggml import TYPES, GGMLState, ggml_state, set_ggml_state
from secateur.quant.state import QuantState, quant_state, set_quant_state
from secateur.recovery.data import pack
from secateur.recovery.kd_loss import Divergence
from secateur.recovery.training import TrainConfig, TrainResult, recovery_loaded, train

Learnable = Literal["scales", "minimums", "norms", "biases"]


class DWQConfig(TrainConfig):
    """Learn a quantized model's scales (codes frozen) by distillation from the dense model."""

    method: ClassVar[str] = "dwq"
    kind: ClassVar[StepKind] = "recover"
    # what `Distillation` reads: pure divergence on the text, teacher on the fly
    kd_weight: ClassVar[float] = 1.0
    ce_weight: ClassVar[float] = 0.0
    hidden_weight: ClassVar[float] = 0.0
    data_mode: ClassVar[str] = "text"
    loss_start: ClassVar[int] = 0
    fused_loss: ClassVar[bool] = False  # the head may hold rounded blocks, not a Linear

    lr: float = Field(2e-4, gt=0, description="peak learning rate (AdamW) of the relative "
                                              "scale changes and of norms and biases")
    schedule: Literal["linear", "cosine"] = Field(
        "cosine", description="decay after warm-up, down to 0 at the last step")
    loss: Divergence = Field("forward_kl", description="divergence from the teacher: "
                                                       "forward_kl, reverse_kl or jsd")
    temperature: float = Field(1.0, gt=0, description="softmax temperature of both models")
    learn: tuple[Learnable, ...] = Field(
        ("scales", "minimums", "norms", "biases"),
        description="what is trained: scales (ggml d/dmin, compressed-tensors scale), "
                    "minimums (ggml Q4_1/Q5_1 m, K-types dmin), norms (norm weights and "
                    "biases), biases (of the quantized linears)")
    keep_masks: bool = Field(False, description="unused by DWQ: the frozen codes fix which "
                                                "weights sit on a code")


# -- one quantized linear's weight as a function of its frozen codes ------------------------

class _GGMLWeight(nn.Module):
    """s * (q - zero) + b per sub-block, from learnt relative changes of the stored fields."""

    def __init__(self, state: GGMLState, learn: tuple[str, ...]) -> None:
        super().__init__()
        self.state, self.t = state, TYPES[state.type]
        f = state.fields
        rows, cols = state.codes.shape
        self.register_buffer("qz", state.codes.float() - self.t.zero, persistent=False)
        self.register_buffer("d0", f["d"].float().clone(), persistent=False)
        # the second stored factor: Q4_1/Q5_1's minimum, K-types' dmin (None: symmetric)
        second = {"Q4_1": "m", "Q5_1": "m", "Q4_K": "dmin", "Q5_K": "dmin"}.get(state.type)
        self.second = second
        self.register_buffer("m0", f[second].float().clone() if second else None,
                             persistent=False)
        # K-types: the integer sub-block scales (and minimums) that stay fixed
        self.register_buffer("sc", f["sc"].float() if "sc" in f else None, persistent=False)
        self.register_buffer("mq", f["m"].float() if second == "dmin" else None,
                             persistent=False)
        self.r_d = nn.Parameter(torch.zeros_like(self.d0), requires_grad="scales" in learn)
        self.r_m = nn.Parameter(torch.zeros_like(self.d0),
                                requires_grad=second is not None and "minimums" in learn)
        self.shape = (rows, cols)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        d = self.d0 * (1 + self.r_d)
        m = None if self.m0 is None else self.m0 + self.d0 * self.r_m
        return d, m

    def grid(self, d: torch.Tensor, m: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """s, b (rows, sub-blocks), in the same float32 operations as `choose_grid`."""
        rows = d.shape[0]
        if self.sc is not None:  # K-types and Q6_K: d (rows, blocks) x sc (rows, blocks, nsub)
            s = (d[..., None] * self.sc).reshape(rows, -1)
            b = (-(m[..., None] * self.mq)).reshape(rows, -1) if self.mq is not None \
                else torch.zeros_like(s)
            return s, b
        return d, m if m is not None else torch.zeros_like(d)

    def weight(self, s: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        rows, cols = self.shape
        q = self.qz.view(rows, -1, self.t.sub)
        return (s[..., None] * q + b[..., None]).reshape(rows, cols)

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return self.weight(*self.grid(*self.factors())).to(original.dtype)

    def projected(self) -> GGMLState:
        """The state the format stores: learnt factors rounded to fp16, grid rebuilt."""
        with torch.no_grad():
            d, m = self.factors()
            d = d.to(torch.float16).to(torch.float32)
            m = None if m is None else m.to(torch.float16).to(torch.float32)
            s, b = self.grid(d, m)
        fields = dict(self.state.fields)
        fields["d"] = d
        if self.second is not None:
            fields[self.second] = m
        return GGMLState(self.state.type, self.state.codes, s.contiguous(), b.contiguous(),
                         fields, self.state.imatrix, self.state.imatrix_tokens)


class _GroupWeight(nn.Module):
    """(q - zero) * scale per group, the scale learnt as a relative change."""

    def __init__(self, state: QuantState, codes: torch.Tensor, learn: tuple[str, ...]) -> None:
        super().__init__()
        self.state = state
        g = state.groups_of_columns(codes.shape[1])
        self.register_buffer("g", g, persistent=False)
        self.register_buffer("codes", codes, persistent=False)
        self.register_buffer("qz", codes.float() - state.zero[:, g], persistent=False)
        self.register_buffer("s0", state.scale.float().clone(), persistent=False)
        self.r_s = nn.Parameter(torch.zeros_like(self.s0), requires_grad="scales" in learn)

    def scale(self) -> torch.Tensor:
        return self.s0 * (1 + self.r_s)

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return (self.qz * self.scale()[:, self.g]).to(original.dtype)

    def projected(self) -> tuple[QuantState, torch.Tensor]:
        """The new state and the weight, computed as `QuantState.dequantize` computes it."""
        with torch.no_grad():
            state = QuantState(self.state.bits, self.state.group_size, self.state.symmetric,
                               self.scale().detach().clone(), self.state.zero,
                               self.state.g_idx, self.state.actorder)
        return state, state.dequantize(self.codes)


def quantized_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear a quantize step rounded (ggml or compressed-tensors grids)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and (ggml_state(m) is not None
                                             or quant_state(m) is not None)}


def frozen_codes(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each quantized linear's integer codes (what DWQ must leave exactly as they were)."""
    out = {}
    for name, m in quantized_linears(model).items():
        g = ggml_state(m)
        out[name] = g.codes.clone() if g is not None else quant_state(m).codes(m.weight)
    return out


class _Parametrized:
    """The model with its quantized weights turned into functions of trainable grids."""

    def __init__(self, model: nn.Module, learn: tuple[str, ...],
                 norms: list[nn.Module]) -> None:
        self.model = model
        self.grids: dict[str, tuple[nn.Module, nn.Module]] = {}
        for p in model.parameters():
            p.requires_grad_(False)
        for name, module in quantized_linears(model).items():
            g, q = ggml_state(module), quant_state(module)
            if g is not None:
                grid: nn.Module = _GGMLWeight(g, learn)
            else:
                grid = _GroupWeight(q, q.codes(module.weight), learn)
            parametrize.register_parametrization(module, "weight", grid, unsafe=True)
            module.parametrizations.weight.original.requires_grad_(False)
            if "biases" in learn and module.bias is not None:
                module.bias.requires_grad_(True)
            self.grids[name] = (module, grid)
        if "norms" in learn:
            for module in norms:
                for p in module.parameters(recurse=False):
                    p.requires_grad_(True)

    def finish(self) -> None:
        """Project onto the stored format, write the exact weights, drop the parametrization."""
        for module, grid in self.grids.values():
            if isinstance(grid, _GGMLWeight):
                state = grid.projected()
                weight = state.dequantize()
                set_ggml_state(module, state)
            else:
                state, weight = grid.projected()
                set_quant_state(module, state)
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
            with torch.no_grad():
                module.weight.copy_(weight.to(module.weight.dtype))
        for p in self.model.parameters():
            p.requires_grad_(False)

    def abandon(self) -> None:
        """After an error: the original weights back, nothing trainable."""
        for module, _ in self.grids.values():
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        for p in self.model.parameters():
            p.requires_grad_(False)


def check_models(student: Loaded, teacher: Loaded) -> None:
    """Refuse, before any work, a pair DWQ cannot use."""
    if teacher.model is student.model:
        raise SecateurError("the teacher is the quantized model itself: give the unquantized "
                            "model it was quantized from")
    if not quantized_linears(student.model):
        raise SecateurError("dwq learns the scales of a quantized model: run it after a "
                            "gptq, rtn or gguf step, or on a compressed-tensors folder")
    s_vocab = student.model.get_output_embeddings().weight.shape[0]
    t_vocab = teacher.model.get_output_embeddings().weight.shape[0]
    if s_vocab != t_vocab:
        raise SecateurError(f"the teacher's vocabulary ({t_vocab}) differs from the "
                            f"student's ({s_vocab}): give the model it was quantized from")


def dwq(student: Loaded, teacher: Loaded, config: DWQConfig, checkpoint: Path | None = None,
        progress: bool = True, on_step: Callable[[int, float], None] | None = None
        ) -> TrainResult:
    """Learn `student`'s grids in place against `teacher`; its codes stay exactly as they were,
    its weights equal what its quantized format stores."""
    # here, not at the top: importing distill first registers the methods, which import this
    from secateur.recovery.distill import Distillation

    if not isinstance(config, DWQConfig):
        raise SecateurError(f"expected a DWQConfig, got {type(config).__name__}")
    check_models(student, teacher)
    data = pack(student.model, student.tokenizer, config.data, config.seqlen,
                config.heldout_windows, config.seed)
    t_model = teacher.model
    t_model.eval()
    for p in t_model.parameters():
        p.requires_grad_(False)
    pad = student.tokenizer.pad_token_id
    pad = student.tokenizer.eos_token_id if pad is None else pad
    objective = Distillation(config, data, t_model, None, None, None, pad)  # type: ignore[arg-type]
    grids = _Parametrized(student.model, config.learn, student.adapter.norm_modules())
    extra: dict[str, Any] = {"teacher": teacher.name or teacher.path,
                             "quantized_linears": len(grids.grids)}
    try:
        result = train(student, config, objective, data, "selected", checkpoint, progress,
                       on_step, desc=f"dwq ({config.loss})",
                       fingerprint_extra={"teacher": extra["teacher"]})
    except BaseException:
        grids.abandon()
        raise
    grids.finish()
    if config.heldout_windows:
        # the training loop's last evaluation saw the unrounded grids; this is the model kept
        with torch.no_grad():
            extra["heldout_after_projection"] = objective.evaluate(student.model)
    result.extra = extra
    return result


@register_method(DWQConfig)
class DWQ(ModelMethod):
    needs_calibration = False

    def run(self, context: PruneContext) -> dict[str, Any]:
        if context.teacher is None:
            raise SecateurError("dwq needs the unquantized teacher: run it as a recipe step "
                                "after a quantize step, or call secateur.recovery.dwq.dwq")
        from secateur.recovery.training import training_on

        loaded, reference = recovery_loaded(context), context.teacher()
        # the API moved the student to its device; the teacher follows it for the training
        with training_on(next(loaded.model.parameters()).device, loaded, reference):
            return dwq(loaded, reference, self.config, context.checkpoint, context.progress,
                       context.on_step).to_dict()
