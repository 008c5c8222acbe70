"""LoRA recovery after pruning (LLM-Pruner's recovery stage): fine-tune low-rank adapters on
the language-model loss of a text, merge them into the weights, save the merged model.

The loop is `secateur.recovery.training`'s: packed windows of the text in a seeded order, AdamW
with warm-up and decay, a resumable checkpoint every `save_every` steps beside the output
directory, and pruned weights kept exactly zero through the merge. The merged model keeps the
pruned model's classes and config: a stock config stays stock, secateur's per-layer-width class
keeps its `auto_map`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from secateur.config import StepKind
from secateur.methods.base import ModelMethod, PruneContext, register_method
from secateur.models.loading import Loaded
from secateur.recovery.data import TokenWindows, pack
from secateur.recovery.kd_loss import lm_loss
from secateur.recovery.training import (
    TrainConfig,
    TrainResult,
    recovery_loaded,
    train,
    training_on,
)
from secateur.recovery.training import target_modules as target_modules  # re-exported


class LoRAConfig(TrainConfig):
    """LoRA on the LM loss; defaults follow LLM-Pruner's recovery (rank 8, alpha 16, dropout
    0.05, lr 1e-4, linear decay)."""

    method: ClassVar[str] = "lora"
    kind: ClassVar[StepKind] = "recover"




class LanguageModeling:
    """Objective: next-token cross-entropy on the text itself."""

    def __init__(self, data: TokenWindows) -> None:
        self.data = data

    def loss(self, model: nn.Module, index: torch.Tensor, sample: int
             ) -> tuple[torch.Tensor, dict[str, float]]:
        ids = self.data.train[index].to(next(model.parameters()).device)
        loss = lm_loss(model(input_ids=ids, use_cache=False).logits, ids)
        return loss, {"ce": loss.item()}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """exp(mean next-token NLL) of the held-out windows (all the same length)."""
        device = next(model.parameters()).device
        nll = [float(lm_loss(model(input_ids=w[None].to(device), use_cache=False).logits,
                             w[None].to(device))) for w in self.data.heldout]
        return {"heldout_ppl": math.exp(sum(nll) / len(nll))}


def train_lora(loaded: Loaded, config: LoRAConfig, checkpoint: Path | None = None,
               progress: bool = True,
               on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Fine-tune LoRA adapters on `loaded.model`, merge them in; `loaded.model` is replaced."""
    data = pack(loaded.model, loaded.tokenizer, config.data, config.seqlen, config.heldout_windows,
                config.seed)
    return train(loaded, config, LanguageModeling(data), data, "lora", checkpoint, progress,
                 on_step, desc="LoRA recovery")


@register_method(LoRAConfig)
class LoRA(ModelMethod):
    needs_calibration = False

    def run(self, context: PruneContext) -> dict[str, Any]:
        loaded = recovery_loaded(context)
        # the API moved the model to its device; training_on adds gradient checkpointing
        # there on CUDA
        with training_on(next(loaded.model.parameters()).device, loaded):
            return train_lora(loaded, self.config, context.checkpoint, context.progress,
                              context.on_step).to_dict()
