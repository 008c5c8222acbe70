"""The one training loop behind every recovery: LoRA on the LM loss and distillation.

An `Objective` says what a micro-batch costs (cross-entropy, a divergence from the teacher,
...) and how to score the held-out windows; this module does the rest the same way for all of
them: full fine-tuning or LoRA (peft, merged at the end), AdamW with warm-up and linear or
cosine decay, gradient accumulation, optional bf16 autocast, pruning masks kept exactly zero,
a held-out evaluation every K steps, and a checkpoint every `save_every` steps from which a
killed run resumes bit-identically (weights, optimizer, RNG and progress are all in it, and the
data order is a function of the step). The checkpoint is one safetensors file with its JSON
(`recovery.state_file`): nothing in it is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from pydantic import Field
from pydantic_core import to_jsonable_python
from torch import nn
from tqdm.auto import tqdm

from secateur.config import MethodConfig
from secateur.device import model_device, on_device
from secateur.errors import SecateurError
from secateur.methods.base import PruneContext
from secateur.models.base import adapter_for
from secateur.models.loading import Loaded
from secateur.models.mask import mask_keys
from secateur.recovery.data import TokenWindows
from secateur.recovery.masks import Masks, projection_modules, record_masks
from secateur.recovery.state_file import load_state, read_meta, save_state

# selected: only the parameters the caller left trainable (DWQ's scales and norms)
Mode = Literal["full", "lora", "selected"]


class TrainConfig(MethodConfig):
    """Settings every recovery trainer shares; not a method by itself."""

    data: str = Field("c4-sample", description="training text: c4-sample, wiki, a Hub name "
                                               "(c4, wikitext2) or a .txt/.jsonl/.parquet file")
    steps: int = Field(200, ge=1, description="optimizer steps")
    seqlen: int = Field(256, ge=2, description="tokens per training window (packed text)")
    batch_size: int = Field(1, ge=1, description="windows per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(1e-4, gt=0, description="peak learning rate (AdamW)")
    warmup_steps: int = Field(10, ge=0, description="steps of linear warm-up")
    schedule: Literal["linear", "cosine"] = Field(
        "linear", description="decay after warm-up, down to 0 at the last step")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping norm (0: none)")
    rank: int = Field(8, ge=1, description="LoRA rank")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha (scale alpha / rank)")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout")
    targets: tuple[str, ...] | None = Field(
        None, description="module names LoRA adapts (default: every decoder projection)")
    bf16: bool = Field(False, description="bf16 autocast for forward passes (losses in fp32)")
    compile: bool = Field(False, description="torch.compile the trained model's forward "
                                             "(inductor; compiles for a minute or more first)")
    keep_masks: bool = Field(True, description="pruned weights (the recorded masks; a model "
                                               "read from disk: its exact zeros) stay exactly "
                                               "zero")
    heldout_windows: int = Field(4, ge=0, description="windows held out from the end of the text "
                                                   "for held-out perplexity")
    heldout_every: int = Field(0, ge=0, description="held-out evaluation every K steps (0: "
                                                 "before and after only)")
    save_every: int = Field(50, ge=1, description="checkpoint every K steps (resumable)")
    seed: int = Field(0, description="seed for data order, LoRA init, dropout and sampling")

    def fingerprint(self, extra: dict[str, Any] | None = None) -> str:
        """What a checkpoint must have been made with (save_every only changes when).

        Only settings away from their defaults count, so a setting a later version adds (at
        a default that keeps the old arithmetic) leaves a run begun before it resumable."""
        fields = type(self).model_fields
        settings = {k: v for k, v in self.settings().items() if k != "save_every" and not (
            k in fields and v == to_jsonable_python(fields[k].get_default(
                call_default_factory=True)))}
        blob = json.dumps({"settings": settings, "extra": extra or {}}, sort_keys=True,
                          default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Objective(Protocol):
    def loss(self, model: nn.Module, index: torch.Tensor, sample: int
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of training windows `index` (the micro-batch starting at sample `sample`)."""

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Held-out metrics of `model` (in eval mode, no gradients)."""


@dataclass
class TrainResult:
    method: str
    settings: dict[str, Any]
    mode: str
    steps: int
    resumed_from: int
    tokens: int  # tokens fed to the student over the whole run, resumes included
    seconds: float = 0.0  # training wall time, resumes included
    tokens_per_second: float = 0.0
    losses: list[float] = field(default_factory=list)  # total loss per optimizer step
    parts: dict[str, list[float]] = field(default_factory=dict)  # each term per step
    evals: list[dict[str, float]] = field(default_factory=list)  # held-out, by step
    trainable_parameters: int = 0
    masks: dict[str, int] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainResult:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up to the peak, then linear or cosine decay to 0 at the last step."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    left = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / left)
    if config.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    return 1 - progress


def target_modules(loaded: Loaded) -> list[str]:
    """The leaf names of every decoder projection (q_proj, ..., down_proj)."""
    return sorted({path.split(".")[-1] for path, _ in projection_modules(loaded.adapter)})


def _wrap(loaded: Loaded, config: TrainConfig, mode: Mode) -> tuple[nn.Module, list[nn.Parameter]]:
    if mode == "selected":
        return loaded.model, [p for p in loaded.model.parameters() if p.requires_grad]
    if mode == "full":
        model = loaded.model
        for p in model.parameters():
            p.requires_grad_(True)
        return model, [p for p in model.parameters() if p.requires_grad]
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                      target_modules=list(config.targets or target_modules(loaded)),
                      bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(loaded.model, lora)
    return model, [p for p in model.parameters() if p.requires_grad]


def _trainable_state(model: nn.Module, mode: Mode) -> dict[str, torch.Tensor]:
    if mode == "lora":
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(model)
    # Pruning masks are not trained: they come with the model, which a resumed run may have
    # read from disk without them (a recipe's step checkpoint).
    skip = mask_keys(model)
    return {k: v for k, v in model.state_dict().items() if k not in skip}


def _load_trainable(model: nn.Module, mode: Mode, state: dict[str, torch.Tensor]) -> None:
    if mode == "lora":
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, state)
        return
    missing, unexpected = model.load_state_dict(state, strict=False)
    skip = mask_keys(model)
    if unexpected or [k for k in missing if k not in skip]:
        raise SecateurError("the training checkpoint does not fit the model: remove it to "
                            "start afresh")


STATE = "state.safetensors"


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    save_state(path / STATE, payload)


def run_fingerprint(loaded: Loaded, config: TrainConfig, mode: Mode,
                    extra: dict[str, Any] | None = None) -> str:
    """What a checkpoint must match: the settings, the mode and the model's shapes."""
    shapes = {n: list(p.shape) for n, p in loaded.model.named_parameters()}
    return config.fingerprint({"mode": mode, "shapes": shapes, **(extra or {})})


def load_checkpoint(path: Path, fingerprint: str, tensors: bool = True
                    ) -> dict[str, Any] | None:
    """The state saved in `path`, or None; another run's state is an error. The settings are
    compared from the file's header, before any tensor is read (`tensors=False`: only that)."""
    file = path / STATE
    if not file.is_file():
        return None
    try:
        meta = read_meta(file)
    except SecateurError as err:
        raise SecateurError(f"the checkpoint in '{path}' cannot be resumed ({err}): remove "
                            "it to start afresh, or choose another --out") from None
    if meta.get("fingerprint") != fingerprint:
        # no run holds it (this one has the lock): removing it loses nothing live
        raise SecateurError(f"the checkpoint in '{path}' was made with other settings "
                            f"({meta.get('settings')}): rerun with those to resume it, remove "
                            "it to start afresh, or choose another --out")
    return load_state(file) if tensors else meta


def _autocast(model: nn.Module, enabled: bool):
    device = next(model.parameters()).device.type
    return torch.autocast(device, dtype=torch.bfloat16, enabled=enabled)


class _Run:
    """One training run's moving parts: the wrapped model, optimizer, masks and result."""

    def __init__(self, loaded: Loaded, config: TrainConfig, objective: Objective,
                 data: TokenWindows, mode: Mode, fingerprint_extra: dict[str, Any]) -> None:
        self.loaded, self.config, self.objective, self.data, self.mode = (
            loaded, config, objective, data, mode)
        self.masks = record_masks(loaded.model, loaded.adapter) if config.keep_masks \
            else Masks()
        self.fingerprint = run_fingerprint(loaded, config, mode, fingerprint_extra)
        torch.manual_seed(config.seed)  # LoRA's initial A matrices, then dropout
        self.model, self.params = _wrap(loaded, config, mode)
        # the compiled module shares the model's parameters; saving and merging use the model
        self.forward = torch.compile(self.model) if config.compile else self.model
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr,
                                           weight_decay=config.weight_decay)
        self.result = TrainResult(method=config.method, settings=config.settings(), mode=mode,
                                  steps=config.steps, resumed_from=0, tokens=0,
                                  trainable_parameters=sum(p.numel() for p in self.params),
                                  masks=self.masks.summary(), data=data.record)

    def resume(self, checkpoint: Path) -> None:
        state = load_checkpoint(checkpoint, self.fingerprint)
        if state is None:
            return
        _load_trainable(self.model, self.mode, state["trainable"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        self.result = TrainResult.from_dict(state["result"])
        self.result.resumed_from = state["step"]

    def save(self, checkpoint: Path, done: int) -> None:
        save_checkpoint(checkpoint, {
            "fingerprint": self.fingerprint, "settings": self.config.settings(), "step": done,
            "trainable": _trainable_state(self.model, self.mode),
            "optimizer": self.optimizer.state_dict(), "rng": torch.get_rng_state(),
            "result": self.result.to_dict()})

    def evaluate(self, step: int) -> None:
        model, config = self.model, self.config
        if not config.heldout_windows:
            return
        model.eval()
        with torch.no_grad(), _autocast(model, config.bf16):
            record = {"step": step, "tokens": self.result.tokens,
                      **self.objective.evaluate(self.forward)}
        model.train()
        self.result.evals.append(record)

    def step(self, step: int) -> float:
        """One optimizer step over `grad_accum` micro-batches; returns the mean loss."""
        config, model = self.config, self.model
        for group in self.optimizer.param_groups:
            group["lr"] = config.lr * lr_factor(step, config)
        total, parts = 0.0, {}
        for micro in range(config.grad_accum):
            sample = (step * config.grad_accum + micro) * config.batch_size
            index = self.data.indices(sample, config.batch_size)
            with _autocast(model, config.bf16):
                loss, terms = self.objective.loss(self.forward, index, sample)
            if not math.isfinite(loss.item()):
                raise SecateurError(f"the training loss became {loss.item()} at step {step}: "
                                    "lower --lr")
            (loss / config.grad_accum).backward()
            total += loss.item() / config.grad_accum
            for k, v in terms.items():
                parts[k] = parts.get(k, 0.0) + v / config.grad_accum
        self.masks.mask_grads(model)
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.mode == "full":
            self.masks.apply(model)  # AdamW keeps masked zeros at zero; this makes it exact
        self.result.losses.append(total)
        for k, v in parts.items():
            self.result.parts.setdefault(k, []).append(v)
        return total

    def loop(self, checkpoint: Path | None, progress: bool,
             on_step: Callable[[int, float], None] | None, desc: str) -> None:
        config, result = self.config, self.result
        start = result.resumed_from
        self.model.train()
        if start == 0:
            self.evaluate(0)
        per_step = config.batch_size * config.grad_accum * config.seqlen
        begin, seconds_before = time.perf_counter(), result.seconds
        bar = tqdm(range(start, config.steps), desc=desc, disable=not progress, initial=start,
                   total=config.steps, unit="step")
        for step in bar:
            loss = self.step(step)
            done = step + 1
            result.tokens = done * per_step
            elapsed = time.perf_counter() - begin
            result.seconds = seconds_before + elapsed
            bar.set_postfix(loss=f"{loss:.4f}",
                            tok_s=f"{(done - start) * per_step / max(elapsed, 1e-9):.0f}")
            if config.heldout_every and done % config.heldout_every == 0 and done < config.steps:
                self.evaluate(done)
            if checkpoint is not None and done % config.save_every == 0 and done < config.steps:
                self.save(checkpoint, done)
            if on_step is not None:
                on_step(done, loss)
        self.evaluate(config.steps)
        result.tokens_per_second = result.tokens / result.seconds if result.seconds else 0.0

    def finish(self) -> None:
        """Merge LoRA, put the masks back, freeze; `loaded` then holds the trained model."""
        model = self.model.merge_and_unload() if self.mode == "lora" else self.model
        self.masks.apply(model)  # the LoRA delta is dense: the merge wrote into pruned weights
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        if model is not self.loaded.model:
            self.loaded.model, self.loaded.adapter = model, adapter_for(model)

    def abandon(self) -> None:
        """After an error: no adapters left in the model, nothing trainable."""
        if self.mode == "lora":
            self.model.unload()
        for p in self.loaded.model.parameters():
            p.requires_grad_(False)


def train(loaded: Loaded, config: TrainConfig, objective: Objective, data: TokenWindows,
          mode: Mode, checkpoint: Path | None = None, progress: bool = True,
          on_step: Callable[[int, float], None] | None = None, desc: str = "training",
          fingerprint_extra: dict[str, Any] | None = None) -> TrainResult:
    """Train `loaded.model` on `objective`; LoRA is merged in and masks re-applied at the end,
    so `loaded.model` is the finished model (the same object unless peft replaced it).
    `checkpoint` (a folder) makes the run resumable; `on_step(step, loss)` runs after each
    step and its checkpoint."""
    run = _Run(loaded, config, objective, data, mode, fingerprint_extra or {})
    try:
        if checkpoint is not None:
            run.resume(checkpoint)
        run.loop(checkpoint, progress, on_step, desc)
    except BaseException:
        run.abandon()
        raise
    run.finish()
    return run.result


def recovery_loaded(context: PruneContext) -> Loaded:
    """The model a recovery step trains: the API's Loaded, or one built from the context."""
    if context.loaded is not None:
        return context.loaded
    return Loaded(context.model, context.tokenizer, context.adapter, "", "")


@contextmanager
def training_on(device: torch.device | None, student: Loaded,
                teacher: Loaded | None = None) -> Iterator[None]:
    """Student (and teacher) on `device` for the training, back home after, also when the
    training replaced `student.model` (a LoRA merge). On CUDA the student trains with
    gradient checkpointing (activations recomputed in the backward: a layer's worth of
    them resident, not the whole model's); the CPU path is unchanged."""
    home = model_device(student.model)
    with ExitStack() as stack:
        stack.enter_context(on_device(student.model, device))
        if teacher is not None:
            stack.enter_context(on_device(teacher.model, device))
        checkpointing = (device is not None and device.type == "cuda"
                         and getattr(student.model, "supports_gradient_checkpointing", False))
        if checkpointing:
            student.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        try:
            yield
        finally:
            if checkpointing and hasattr(student.model, "gradient_checkpointing_disable"):
                student.model.gradient_checkpointing_disable()
    student.model.to(home)
