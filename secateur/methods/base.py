"""The method contract and registry.

A method is a typed config (`secateur.config.MethodConfig`) registered with its handler in
the method's own file: `@register_method(WandaConfig)` on the handler class. Two kinds of
handler exist. A `LayerwiseMethod` acts on one decoder layer at a time inside the sequential
engine (magnitude, Wanda, SparseGPT, GPTQ): it declares the statistics it needs, the engine
gathers exactly those, and `apply` decides. A `ModelMethod` needs the whole model (width,
block and layer pruning, recovery); it receives a `PruneContext` whose callables
(statistics, block search, teacher) the API injects, so methods never import the engine.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from secateur.config import MethodConfig
from secateur.errors import SecateurError
from secateur.models.base import ModelAdapter, Projection
from secateur.stats import Statistic


@dataclass
class LayerReport:
    """What a method did to one layer: per-matrix numbers plus the layer's output error."""

    index: int
    matrices: dict[str, dict[str, float]] = field(default_factory=dict)
    relative_error: float | None = None
    target: float | None = None


class Handler(ABC):
    """What every handler holds: the config it carries out."""

    config_class: ClassVar[type[MethodConfig]]

    def __init__(self, config: MethodConfig) -> None:
        self.config = config

    @property
    def name(self) -> str:
        return self.config.method


class LayerwiseMethod(Handler):
    needs: ClassVar[tuple[type[Statistic], ...]] = ()
    # True: projections fed the very same input tensor (q/k/v, gate/up) get one statistic
    # object between them, gathered once; a method that frees a statistic after each matrix
    # must leave it False.
    shares_statistics: ClassVar[bool] = False
    # True: `apply` treats each projection on its own, so under torch.distributed each rank
    # may be handed only the projections it solves (`secateur.distributed.solve_layer`).
    # False (the safe default): every rank runs the whole layer and rank 0's is kept.
    splits_solves: ClassVar[bool] = False

    @property
    def sequential(self) -> bool:
        """Feed each layer the already-compressed layers' outputs (the published default)."""
        return getattr(self.config, "sequential", True)

    @property
    def sequential_within_layer(self) -> bool:
        """Compress a layer's projections group by group (q/k/v, o, gate/up, down), each on
        statistics gathered after the groups before it changed (GPTQ's true-sequential)."""
        return getattr(self.config, "true_sequential", False)

    @property
    def error_report(self) -> bool:
        """Measure each layer's output error against the dense layer (costs the part of a
        layer pass that only the report needs)."""
        return getattr(self.config, "error_report", True)

    def prepare(self, model: nn.Module, adapter: ModelAdapter,
                context: PruneContext | None = None) -> None:
        """Called once before the layer loop (OWL computes its per-layer ratios here)."""
        return None

    @abstractmethod
    def apply(self, index: int, projections: dict[str, Projection],
              stats: dict[str, dict[str, Statistic]]) -> LayerReport: ...

    def summary(self) -> dict[str, Any]:
        return {}


@dataclass
class PruneContext:
    """What a whole-model method may use; filled in by the API."""

    model: nn.Module
    tokenizer: Any
    adapter: ModelAdapter
    calibration: list[torch.Tensor]
    seed: int
    progress: bool = True
    loaded: Any = None  # secateur.models.loading.Loaded of `model`
    layerwise_stats: Callable[..., Any] | None = None
    # block_search(subset=None, batch_size=8, dtype=None) -> engine.block_search.BlockSearch:
    # cheap calibration loss with candidate blocks/layers removed (depth pruning)
    block_search: Callable[..., Any] | None = None
    # teacher() -> Loaded: the model as it was before the recipe's first step (distillation)
    teacher: Callable[[], Any] | None = None
    # A recovery's resumable training state goes here (the recover/distill commands and a
    # recipe give one, so a rerun continues); None keeps nothing on disk beyond the run.
    checkpoint: Path | None = None
    # on_step(step, loss) after every training step of a recovery (the CLI's progress line)
    on_step: Callable[[int, float], None] | None = None


class ModelMethod(Handler):
    # Recovery trains on its own text; it needs no calibration windows.
    needs_calibration: ClassVar[bool] = True

    @abstractmethod
    def run(self, context: PruneContext) -> dict[str, Any]:
        """Change the model in place (or replace modules); return a JSON-able summary."""


HandlerClass = type[LayerwiseMethod] | type[ModelMethod]
_REGISTRY: dict[str, tuple[type[MethodConfig], HandlerClass]] = {}


def register_method(config_class: type[MethodConfig]) -> Callable[[HandlerClass], HandlerClass]:
    """Class decorator: `config_class` is carried out by the decorated handler."""

    def register(handler: HandlerClass) -> HandlerClass:
        handler.config_class = config_class
        _REGISTRY[config_class.method] = (config_class, handler)
        return handler

    return register


def registered() -> dict[str, tuple[type[MethodConfig], HandlerClass]]:
    """Method name -> (config class, handler) for every method registered so far; the names
    of all built-in ones are looked up through `secateur.registry`, which imports them."""
    return dict(_REGISTRY)


def build_method(config: MethodConfig) -> LayerwiseMethod | ModelMethod:
    if not isinstance(config, MethodConfig):
        raise SecateurError(f"expected a method config such as WandaConfig(sparsity=0.5), got "
                            f"{type(config).__name__}")
    return _REGISTRY[config.method][1](config)
