"""LoRA recovery after pruning (LLM-Pruner's recovery stage): fine-tune low-rank adapters on
a text, merge them into the weights, save the merged model.

Training draws `steps * batch_size` random windows of `seqlen` tokens from the text (the same
seeded sampler as calibration), runs AdamW with linear warm-up and decay, and writes a
checkpoint (adapter weights, optimizer, schedule, RNG state) every `save_every` steps beside
the output directory, so an interrupted run picks up from its last checkpoint when started
again with the same settings. The merged model keeps the pruned model's classes and config:
a stock config stays stock, secateur's per-layer-width class keeps its `auto_map`.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from secateur.errors import SecateurError
from secateur.models.loading import Loaded


@dataclass
class LoraSpec:
    """Defaults follow LLM-Pruner's recovery (rank 8, alpha 16, dropout 0.05, lr 1e-4)."""

    data: str = "c4-sample"
    steps: int = 200
    seqlen: int = 256
    batch_size: int = 1
    lr: float = 1e-4
    warmup_steps: int = 10
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    targets: list[str] | None = None  # module names; None: every projection of the decoder
    seed: int = 0
    save_every: int = 50

    def validate(self) -> None:
        for key in ("steps", "seqlen", "batch_size", "rank", "save_every"):
            if getattr(self, key) < 1:
                raise SecateurError(f"--{key.replace('_', '-')} must be at least 1, got "
                                    f"{getattr(self, key)}")
        if not self.lr > 0:
            raise SecateurError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.dropout < 1:
            raise SecateurError(f"--lora-dropout must be in [0, 1), got {self.dropout}")

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class LoraResult:
    spec: dict[str, Any]
    steps: int
    resumed_from: int
    tokens: int
    losses: list[float] = field(default_factory=list)  # mean loss per logged interval
    seconds: float = 0.0
    trainable_parameters: int = 0


def target_modules(loaded: Loaded) -> list[str]:
    """The leaf names of every decoder projection (q_proj, ..., down_proj), from the adapter."""
    adapter = loaded.adapter
    names: set[str] = set()
    for layer in adapter.layers:
        names.update(name.split(".")[-1] for name in adapter.linears(layer))
    return sorted(names)


def checkpoint_dir(out: Path) -> Path:
    out = Path(out)
    return out.with_name(f".{out.name}.lora-checkpoint")


def _schedule(spec: LoraSpec) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        left = max(1, spec.steps - spec.warmup_steps)
        return max(0.0, 1 - (step - spec.warmup_steps) / left)

    return factor


def _save_checkpoint(path: Path, step: int, model, optimizer, scheduler, spec: LoraSpec,
                     losses: list[float]) -> None:
    from peft import get_peft_model_state_dict

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({"adapter": get_peft_model_state_dict(model), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(),
                "step": step, "losses": losses}, tmp / "state.pt")
    (tmp / "spec.json").write_text(json.dumps({"fingerprint": spec.fingerprint(),
                                               "spec": asdict(spec), "step": step}))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)  # a checkpoint is either whole or absent


def _load_checkpoint(path: Path, spec: LoraSpec) -> dict[str, Any] | None:
    if not (path / "state.pt").is_file():
        return None
    meta = json.loads((path / "spec.json").read_text())
    if meta["fingerprint"] != spec.fingerprint():
        raise SecateurError(f"the checkpoint in '{path}' was made with other settings "
                            f"({meta['spec']}): rerun with those, or delete it to start over")
    return torch.load(path / "state.pt", weights_only=False)


def train_lora(loaded: Loaded, spec: LoraSpec, checkpoint: Path | None = None,
               progress: bool = True,
               on_step: Callable[[int, float], None] | None = None) -> LoraResult:
    """Fine-tune LoRA adapters on `loaded.model`, merge them in; `loaded.model` is replaced."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    from secateur.data.sources import load_text
    from secateur.data.windows import calibration_windows

    spec.validate()
    source = load_text(spec.data, split="train")
    torch.manual_seed(spec.seed)
    windows = calibration_windows(loaded.tokenizer, source, spec.steps * spec.batch_size,
                                  spec.seqlen, spec.seed)
    targets = spec.targets or target_modules(loaded)
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=targets, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(loaded.model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(spec))
    start_step, losses = 0, []
    state = _load_checkpoint(checkpoint, spec) if checkpoint is not None else None
    if state is not None:
        set_peft_model_state_dict(model, state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        start_step, losses = state["step"], list(state["losses"])
    model.train()
    begin = time.perf_counter()
    bar = tqdm(range(start_step, spec.steps), desc="LoRA recovery", disable=not progress,
               initial=start_step, total=spec.steps)
    for step in bar:
        batch = torch.cat(windows[step * spec.batch_size:(step + 1) * spec.batch_size])
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        if not math.isfinite(loss.item()):
            raise SecateurError(f"LoRA loss became {loss.item()} at step {step}: lower --lr")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.1e}")
        done = step + 1
        if checkpoint is not None and (done % spec.save_every == 0) and done < spec.steps:
            _save_checkpoint(checkpoint, done, model, optimizer, scheduler, spec, losses)
        if on_step is not None:
            on_step(done, loss.item())
    model.eval()
    merged = model.merge_and_unload()
    merged.eval()
    for p in merged.parameters():
        p.requires_grad_(False)
    loaded.model = merged
    return LoraResult(spec=asdict(spec), steps=spec.steps, resumed_from=start_step,
                      tokens=(spec.steps - start_step) * spec.batch_size * spec.seqlen,
                      losses=losses, seconds=time.perf_counter() - begin,
                      trainable_parameters=sum(p.numel() for p in params))


def recover_job(model_dir: str, out: Path, spec: LoraSpec, evaluation: Any = None,
                json_path: Path | None = None, overwrite: bool = False,
                progress: bool = True,
                on_step: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Load a (pruned) model, evaluate, LoRA-train with checkpoints, merge, evaluate, save."""
    from secateur.api import count_parameters, peak_rss_mib
    from secateur.jobs import evaluate_perplexity
    from secateur.models.loading import load
    from secateur.surgery.save import check_output_dir, dir_bytes, save_model, write_json_atomic

    spec.validate()
    out = Path(out)
    check_output_dir(out, overwrite)
    loaded = load(model_dir)
    result: dict[str, Any] = {"model": str(model_dir), "recovery": "lora"}
    if evaluation is not None and evaluation.data is not None:
        result["perplexity_before"] = evaluate_perplexity(loaded, evaluation,
                                                          progress)["perplexity"]
    ckpt = checkpoint_dir(out)
    run = train_lora(loaded, spec, ckpt, progress, on_step)
    result["lora"] = asdict(run)
    if evaluation is not None and evaluation.data is not None:
        after = evaluate_perplexity(loaded, evaluation, progress)
        result["perplexity"] = after["perplexity"]
        result["protocol"] = after["protocol"]
    result["parameters"] = count_parameters(loaded.model)["parameters"]
    result["peak_rss_mib"] = peak_rss_mib()
    save_model(loaded.model, loaded.tokenizer, out, result, overwrite)
    shutil.rmtree(ckpt, ignore_errors=True)
    result["out"] = str(out)
    result["bytes_on_disk"] = dir_bytes(out)
    if json_path is not None:
        write_json_atomic(Path(json_path), result)
    return result
