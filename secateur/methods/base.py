"""The method contract and registry.

Two kinds of method exist. A `LayerwiseMethod` acts on one decoder layer at a time inside the
sequential engine (magnitude, Wanda, SparseGPT, GPTQ): it declares the statistics it needs,
the engine gathers exactly those, and `apply` decides. A `ModelMethod` needs the whole model
(width, block and layer pruning); it receives a `PruneContext` whose callables (capture,
evaluate) the API injects, so methods never import the engine.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from secateur.errors import SecateurError
from secateur.models.base import ModelAdapter, Projection
from secateur.stats import Statistic


@dataclass
class PruneOptions:
    """Every flag `secateur prune` takes; each method reads the ones it understands."""

    method: str
    sparsity: float | None = None
    nm: str | None = None
    owl: bool = False
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    sequential: bool = True
    # structured, block and layer pruning
    ratio: float | None = None
    importance: str = "taylor"
    blocks: int | None = None
    layers: int | None = None
    search_samples: int | None = None
    # greedy depth searches: screen candidates on a quarter of the windows, score K on all
    search_shortlist: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class LayerReport:
    """What a method did to one layer: per-matrix numbers plus the layer's output error."""

    index: int
    matrices: dict[str, dict[str, float]] = field(default_factory=dict)
    relative_error: float | None = None
    target: float | None = None


class LayerwiseMethod(ABC):
    name: ClassVar[str]
    needs: ClassVar[tuple[type[Statistic], ...]] = ()

    def __init__(self, options: PruneOptions) -> None:
        self.options = options

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
    capture: Callable[..., Any] | None = None
    layerwise_stats: Callable[..., Any] | None = None
    # block_search(subset=None, batch_size=8, dtype=None) -> engine.block_search.BlockSearch:
    # cheap calibration loss with candidate blocks/layers removed (depth pruning)
    block_search: Callable[..., Any] | None = None


class ModelMethod(ABC):
    name: ClassVar[str]

    def __init__(self, options: PruneOptions) -> None:
        self.options = options

    @abstractmethod
    def run(self, context: PruneContext) -> dict[str, Any]:
        """Prune in place (or replace modules); return a JSON-able summary for the result."""


MethodClass = type[LayerwiseMethod] | type[ModelMethod]
_METHODS: dict[str, MethodClass] = {}


def register_method(cls: MethodClass) -> MethodClass:
    _METHODS[cls.name] = cls
    return cls


def method_names() -> list[str]:
    return sorted(_METHODS)


def build_method(options: PruneOptions) -> LayerwiseMethod | ModelMethod:
    cls = _METHODS.get(options.method)
    if cls is None:
        raise SecateurError(f"unknown method '{options.method}': use one of "
                            f"{', '.join(method_names())}")
    return cls(options)
