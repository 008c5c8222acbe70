"""Knowledge distillation: a pruned student learns the dense teacher's next-token distribution.

The loss is `kd_weight * D(teacher || student) + ce_weight * CE + hidden_weight * H`, where D
is forward KL, reverse KL or Jensen-Shannon on the full vocabulary at a temperature (scaled by
T^2), CE is the language-model loss on the same tokens, and H the normalized MSE between
hidden states of matched layers (see `layer_map`). Data is packed text (`text`), the first P
tokens of each window completed once by the teacher (`teacher_generated`, sequence-level KD),
or completed by the student itself at every step (`on_policy`, as in GKD/MiniLLM); with
generated data the loss covers only the completion. Teacher logits are computed on the fly, or
read from a top-k or full cache built once (`teacher_cache`), which only pays when windows are
replayed (more samples than windows) and is not allowed on-policy, where nothing repeats.
Training itself (full fine-tuning or LoRA, AdamW, warm-up and cosine decay, accumulation, bf16
autocast, masks, resumable checkpoints) is `secateur.recovery.training`.
"""

from __future__ import annotations

import math
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from secateur.bench.measure import same_tokenizer
from secateur.config import StepKind
from secateur.errors import SecateurError
from secateur.methods.base import ModelMethod, PruneContext, register_method
from secateur.models.loading import Loaded
from secateur.params import count_parameters
from secateur.recovery.data import TokenWindows, pack
from secateur.recovery.fused_head import fused_head_loss
from secateur.recovery.generation import complete
from secateur.recovery.kd_loss import (
    Divergence,
    TeacherTargets,
    kd_loss,
    lm_loss,
    teacher_targets,
)
from secateur.recovery.layer_map import layer_map
from secateur.recovery.teacher_cache import TeacherCache
from secateur.recovery.training import (
    TrainConfig,
    TrainResult,
    load_checkpoint,
    recovery_loaded,
    run_fingerprint,
    train,
    training_on,
)

DistillResult = TrainResult  # one result type for every recovery; `extra` holds KD's details


class DistillConfig(TrainConfig):
    """Distill from the unpruned teacher into the pruned student."""

    method: ClassVar[str] = "distill"
    kind: ClassVar[StepKind] = "recover"

    schedule: Literal["linear", "cosine"] = Field(
        "cosine", description="decay after warm-up, down to 0 at the last step")
    train: Literal["full", "lora"] = Field(
        "full", description="full fine-tuning of every weight, or LoRA adapters (merged)")
    loss: Divergence = Field("forward_kl", description="divergence from the teacher: "
                                                       "forward_kl, reverse_kl or jsd")
    temperature: float = Field(1.0, gt=0, description="softmax temperature of both models")
    kd_weight: float = Field(1.0, ge=0, description="weight of the divergence (0: plain LM "
                                                    "loss, no teacher forward)")
    ce_weight: float = Field(0.0, ge=0, description="weight of the LM cross-entropy added")
    hidden_weight: float = Field(0.0, ge=0, description="weight of the hidden-state MSE of "
                                                        "matched layers")
    layer_map: tuple[int, ...] | None = Field(
        None, description="teacher layer of each student layer (default: found from "
                          "identical norm weights, else uniform)")
    teacher_cache: Literal["none", "topk", "full"] = Field(
        "none", description="teacher logits on the fly, or cached once (top-k + rest, or "
                            "full) for replayed windows")
    topk: int = Field(64, ge=1, description="tokens kept per position by the top-k cache")
    data_mode: Literal["text", "teacher_generated", "on_policy"] = Field(
        "text", description="train on the text, on teacher completions of its prompts, or "
                            "on the student's own completions")
    prompt_tokens: int = Field(32, ge=1, description="prompt length for generated data; the "
                                                     "rest of each window is generated")
    gen_temperature: float = Field(1.0, ge=0, description="sampling temperature of "
                                                          "completions (0: greedy)")
    fused_loss: bool = Field(False, description="lm_head and loss a chunk of positions at a "
                                                "time, never holding the full logits (needs "
                                                "logits = a linear head of the last hidden "
                                                "state)")

    @model_validator(mode="after")
    def _consistent(self) -> DistillConfig:
        if self.kd_weight + self.ce_weight + self.hidden_weight == 0:
            raise ValueError("kd_weight, ce_weight and hidden_weight are all 0: nothing to "
                             "train on")
        if self.data_mode != "text" and self.prompt_tokens >= self.seqlen:
            raise ValueError(f"prompt_tokens ({self.prompt_tokens}) must be shorter than "
                             f"seqlen ({self.seqlen}) to leave room for the completion")
        if self.teacher_cache != "none" and self.data_mode == "on_policy":
            raise ValueError("on-policy data never repeats: use teacher_cache none")
        if self.teacher_cache != "none" and self.hidden_weight > 0:
            raise ValueError("the teacher cache holds logits, not hidden states: use "
                             "teacher_cache none with hidden_weight")
        return self

    @property
    def loss_start(self) -> int:
        """First position whose prediction is trained: the last prompt token when generated."""
        return 0 if self.data_mode == "text" else self.prompt_tokens - 1


def _vocab_rows(model: nn.Module) -> int:
    return model.get_output_embeddings().weight.shape[0]


def check_models(student: Loaded, teacher: Loaded, config: DistillConfig) -> None:
    """Refuse, before any work, a pair that cannot be distilled; warn on a pointless one."""
    if teacher.model is student.model:
        raise SecateurError("the teacher is the student itself: distill from the model the "
                            "student was pruned from")
    s_vocab, t_vocab = _vocab_rows(student.model), _vocab_rows(teacher.model)
    same_tokens = same_tokenizer(student.tokenizer, teacher.tokenizer)
    if s_vocab != t_vocab or not same_tokens:
        raise SecateurError(f"the teacher's vocabulary differs from the student's (logits "
                            f"{t_vocab} vs {s_vocab}"
                            f"{'' if same_tokens else ', different tokenizers'}): distill from "
                            "the model the student was pruned from")
    if config.teacher_cache == "topk" and config.topk >= t_vocab:
        raise SecateurError(f"--topk {config.topk} keeps the whole vocabulary of {t_vocab}: "
                            "use a smaller --topk or --teacher-cache full")
    if config.hidden_weight > 0:
        s_h = student.model.get_input_embeddings().weight.shape[1]
        t_h = teacher.model.get_input_embeddings().weight.shape[1]
        if s_h != t_h:
            raise SecateurError(f"hidden sizes differ (student {s_h}, teacher {t_h}): the "
                                "hidden-state loss needs equal ones, use --hidden-weight 0")
    s_n = count_parameters(student.model)["nonzero"]
    t_n = count_parameters(teacher.model)["nonzero"]
    if s_n >= t_n:
        warnings.warn(f"the student ({s_n:,} non-zero parameters) is not smaller than the "
                      f"teacher ({t_n:,}): distillation will run, but check the models",
                      stacklevel=1)  # one place, so a job that checks twice warns once


def hidden_loss(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...],
                mapping: list[int], start: int) -> torch.Tensor:
    """Mean over matched layers of ||h_s - h_t||^2 / ||h_t||^2 (scale-free across depth).

    `hidden_states` hold the embeddings, then each layer's output, the last one after the
    final norm: the two final entries always face each other, and an inner student layer is
    matched only to an inner teacher layer, so normed and unnormed states never meet."""
    s_layers, t_layers = len(student) - 1, len(teacher) - 1
    pairs = [(i + 1, j + 1) for i, j in enumerate(mapping[:-1]) if j < t_layers - 1]
    pairs.append((s_layers, t_layers))
    terms = []
    for a, b in pairs:
        s, t = student[a][:, start:].float(), teacher[b][:, start:].float()
        terms.append(((s - t) ** 2).mean() / (t**2).mean().clamp(min=1e-12))
    return torch.stack(terms).mean()


def _kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> float:
    targets = teacher_targets(teacher_logits, 1.0)
    return float(kd_loss(student_logits, targets, "forward_kl", 1.0))


class Distillation:
    """The training objective: divergence from the teacher (+ CE, + hidden states)."""

    def __init__(self, config: DistillConfig, data: TokenWindows, teacher: nn.Module,
                 mapping: list[int] | None, cache: TeacherCache | None,
                 sequences: torch.Tensor | None, pad_token_id: int | None) -> None:
        self.config, self.data, self.teacher = config, data, teacher
        self.mapping, self.cache, self.pad_token_id = mapping, cache, pad_token_id
        self.sequences = sequences if sequences is not None else data.train

    def _ids(self, model: nn.Module, index: torch.Tensor, sample: int) -> torch.Tensor:
        if self.config.data_mode != "on_policy":
            return self.sequences[index]
        c = self.config
        prompts = self.data.train[index][:, :c.prompt_tokens]
        # seeded by the sample number: a resumed run generates the same completions
        return complete(model, prompts, c.seqlen - c.prompt_tokens, c.gen_temperature,
                        c.seed * 1_000_003 + sample + 1, self.pad_token_id)

    def _teacher(self, ids: torch.Tensor, index: torch.Tensor
                 ) -> tuple[TeacherTargets | None, tuple[torch.Tensor, ...] | None]:
        c, start = self.config, self.config.loss_start
        if self.cache is not None:
            return self.cache.get(index, ids.device), None
        if not (c.kd_weight > 0 or c.hidden_weight > 0):
            return None, None
        with torch.no_grad():
            out = self.teacher(input_ids=ids.to(next(self.teacher.parameters()).device),
                               use_cache=False, output_hidden_states=c.hidden_weight > 0)
        targets = teacher_targets(out.logits[:, start:-1].to(ids.device), c.temperature)
        hidden = None
        if c.hidden_weight > 0:
            hidden = tuple(h.to(ids.device) for h in out.hidden_states)
        return targets, hidden

    def loss(self, model: nn.Module, index: torch.Tensor, sample: int
             ) -> tuple[torch.Tensor, dict[str, float]]:
        c, start = self.config, self.config.loss_start
        ids = self._ids(model, index, sample).to(next(model.parameters()).device)
        targets, t_hidden = self._teacher(ids, index)
        if c.fused_loss:
            return self._fused_loss(model, ids, targets, t_hidden)
        out = model(input_ids=ids, use_cache=False, output_hidden_states=c.hidden_weight > 0)
        total = torch.zeros((), device=ids.device)
        parts: dict[str, float] = {}
        if c.kd_weight > 0:
            kd = kd_loss(out.logits[:, start:-1], targets, c.loss, c.temperature)
            total, parts["kd"] = total + c.kd_weight * kd, kd.item()
        if c.ce_weight > 0:
            ce = lm_loss(out.logits, ids, start)
            total, parts["ce"] = total + c.ce_weight * ce, ce.item()
        if c.hidden_weight > 0:
            hid = hidden_loss(out.hidden_states, t_hidden, self.mapping, start)
            total, parts["hidden"] = total + c.hidden_weight * hid, hid.item()
        return total, parts

    def _fused_loss(self, model: nn.Module, ids: torch.Tensor, targets: TeacherTargets | None,
                    t_hidden: tuple[torch.Tensor, ...] | None
                    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The same loss as the unfused path, the head and the vocabulary-sized terms taken
        `fused_head.ROWS` positions at a time."""
        c, start = self.config, self.config.loss_start
        # the model's own head runs on the last position only: it checks that the logits are
        # the linear head of the last hidden state, which the fused loss assumes
        out = model(input_ids=ids, use_cache=False, output_hidden_states=True, logits_to_keep=1)
        last, head = out.hidden_states[-1], model.get_output_embeddings()
        with torch.no_grad():
            mine = F.linear(last[:, -1:], head.weight, head.bias).float() \
                if isinstance(head, nn.Linear) else None
        theirs = out.logits[:, -1:].detach().float()
        if mine is None or not torch.allclose(mine, theirs, rtol=1e-3,
                                              atol=1e-3 * float(theirs.abs().max())):
            raise SecateurError("this model's logits are not a linear head of its last hidden "
                                "state (a softcap, a scale or an adapted head): set "
                                "fused_loss false")
        hidden = last[:, start:-1]
        n = hidden.shape[0] * hidden.shape[1]
        labels = ids[:, start + 1:].reshape(-1)
        t_logp = t_index = None
        if targets is not None and c.kd_weight > 0:
            t_logp = targets.logp.reshape(n, -1)
            t_index = None if targets.index is None else targets.index.reshape(n, -1)
        sums = {"kd": 0.0, "ce": 0.0}

        def chunk_loss(logits: torch.Tensor, a: int, b: int) -> torch.Tensor:
            loss = logits.new_zeros(())
            if t_logp is not None:
                chunk = TeacherTargets(t_logp[a:b], None if t_index is None else t_index[a:b])
                # kd_loss is a mean over the chunk's rows: weighted to a share of the n rows
                kd = kd_loss(logits, chunk, c.loss, c.temperature) * ((b - a) / n)
                sums["kd"] += kd.item()
                loss = loss + c.kd_weight * kd
            if c.ce_weight > 0:
                ce = F.cross_entropy(logits, labels[a:b], reduction="sum") / n
                sums["ce"] += ce.item()
                loss = loss + c.ce_weight * ce
            return loss

        total = fused_head_loss(hidden, head, chunk_loss)
        parts = {"kd": sums["kd"]} if t_logp is not None else {}
        if c.ce_weight > 0:
            parts["ce"] = sums["ce"]
        if c.hidden_weight > 0:
            hid = hidden_loss(out.hidden_states, t_hidden, self.mapping, start)
            total, parts["hidden"] = total + c.hidden_weight * hid, hid.item()
        return total, parts

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Held-out perplexity and mean forward KL(teacher || student) at T = 1, per token."""
        device = next(model.parameters()).device
        kls, nlls = [], []
        for window in self.data.heldout:
            ids = window[None].to(device)
            s_logits = model(input_ids=ids, use_cache=False).logits
            t_logits = self.teacher(input_ids=ids.to(next(self.teacher.parameters()).device),
                                    use_cache=False).logits[:, :-1].to(device)
            kls.append(_kl_to_teacher(s_logits[:, :-1], t_logits))
            nlls.append(float(lm_loss(s_logits, ids)))
        return {"heldout_ppl": math.exp(sum(nlls) / len(nlls)),
                "heldout_kl": sum(kls) / len(kls)}


def _generate_once(teacher: nn.Module, data: TokenWindows, config: DistillConfig,
                   used: torch.Tensor, folder: Path | None, fingerprint: str,
                   pad_token_id: int | None, progress: bool) -> tuple[torch.Tensor, float]:
    """Teacher completions of every used window's prompt, kept beside the checkpoint."""
    from tqdm.auto import tqdm

    from secateur.recovery.state_file import load_state, save_state

    path = folder / "generated.safetensors" if folder is not None else None
    if path is not None and path.is_file():
        try:
            saved = load_state(path)
        except SecateurError:
            saved = {}  # damaged or not ours: generated again, and replaced
        if saved.get("fingerprint") == fingerprint and isinstance(saved.get("sequences"),
                                                                  torch.Tensor):
            return saved["sequences"], 0.0
    begin = time.perf_counter()
    sequences = data.train.clone()
    new = config.seqlen - config.prompt_tokens
    batches = list(range(0, len(used), config.batch_size))
    for n, first in enumerate(tqdm(batches, desc="teacher completions", disable=not progress,
                                   leave=False)):
        rows = used[first:first + config.batch_size]
        prompts = data.train[rows][:, :config.prompt_tokens]
        sequences[rows] = complete(teacher, prompts, new, config.gen_temperature,
                                   config.seed + n, pad_token_id)
    if path is not None:
        save_state(path, {"fingerprint": fingerprint, "sequences": sequences})
    return sequences, time.perf_counter() - begin


def distill(student: Loaded, teacher: Loaded, config: DistillConfig,
            checkpoint: Path | None = None, progress: bool = True,
            on_step: Callable[[int, float], None] | None = None) -> DistillResult:
    """Distill `teacher` into `student` in place (LoRA is merged; `student.model` may change).

    `checkpoint` is a folder for the resumable state (and the teacher cache or completions);
    None keeps nothing on disk beyond the run."""
    if not isinstance(config, DistillConfig):
        raise SecateurError(f"expected a DistillConfig, got {type(config).__name__}")
    check_models(student, teacher, config)
    data = pack(student.model, student.tokenizer, config.data, config.seqlen,
                config.heldout_windows, config.seed)
    t_model = teacher.model
    t_model.eval()
    for p in t_model.parameters():
        p.requires_grad_(False)
    extra: dict[str, Any] = {"teacher": teacher.name or teacher.path,
                             "teacher_parameters": count_parameters(t_model)["parameters"],
                             "student_parameters": count_parameters(student.model)["parameters"]}
    mapping = None
    if config.hidden_weight > 0:
        mapping, how = layer_map(student.adapter, teacher.adapter, config.layer_map)
        extra["layer_map"], extra["layer_map_from"] = mapping, how
    samples = config.steps * config.grad_accum * config.batch_size
    used = data.used(samples)
    extra["epochs"] = samples / len(data.train)
    pad = student.tokenizer.pad_token_id
    pad = student.tokenizer.eos_token_id if pad is None else pad
    scratch = None
    folder = checkpoint
    if folder is None and (config.teacher_cache != "none"):
        scratch = tempfile.TemporaryDirectory(prefix="secateur-distill-")
        folder = Path(scratch.name)
    fingerprint = config.fingerprint({"teacher": extra["teacher"]})
    if checkpoint is not None:  # another run's checkpoint fails before any generation
        load_checkpoint(checkpoint, run_fingerprint(student, config, config.train,
                                                    {"teacher": extra["teacher"]}),
                        tensors=False)
    try:
        sequences = None
        if config.data_mode == "teacher_generated":
            sequences, seconds = _generate_once(t_model, data, config, used, folder,
                                                fingerprint, pad, progress)
            extra["generation_seconds"] = seconds
        cache = None
        if config.teacher_cache != "none":
            cache = TeacherCache(Path(folder) / "teacher-cache", config.teacher_cache,
                                 config.topk, config.temperature, config.loss_start)
            cache.build(t_model, sequences if sequences is not None else data.train, used,
                        fingerprint, config.batch_size, config.bf16, progress)
            extra["teacher_cache"] = {"kind": config.teacher_cache, "seconds": cache.seconds,
                                      "bytes": cache.bytes(), "windows": len(used)}
        objective = Distillation(config, data, t_model, mapping, cache, sequences, pad)
        result = train(student, config, objective, data, config.train, checkpoint, progress,
                       on_step, desc=f"distill ({config.loss}, {config.train})",
                       fingerprint_extra={"teacher": extra["teacher"]})
    finally:
        if scratch is not None:
            scratch.cleanup()
    result.extra = extra
    return result


@register_method(DistillConfig)
class Distill(ModelMethod):
    needs_calibration = False

    def run(self, context: PruneContext) -> dict[str, Any]:
        if context.teacher is None:
            raise SecateurError("distillation needs a teacher: run it as a recipe step after "
                                "a prune, or call secateur.recovery.distill.distill")
        student, teacher = recovery_loaded(context), context.teacher()
        # the API moved the student to its device; the teacher joins it for the step
        with training_on(next(student.model.parameters()).device, student, teacher):
            return distill(student, teacher, self.config, context.checkpoint,
                           context.progress, context.on_step).to_dict()
