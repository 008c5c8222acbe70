"""Statistics of a projection's inputs, accumulated as calibration windows stream by.

Below both the engine and the methods: imports neither.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch


class Statistic(ABC):
    """Accumulates something about a projection's input as calibration windows stream by."""

    name: ClassVar[str]

    @abstractmethod
    def __init__(self, in_features: int) -> None: ...

    @abstractmethod
    def add(self, x: torch.Tensor) -> None: ...


class ColumnSquares(Statistic):
    """Sum over tokens of x_j^2 per input column: Wanda's ||X_j||_2^2."""

    name: ClassVar[str] = "column_squares"

    def __init__(self, in_features: int) -> None:
        self.sum = torch.zeros(in_features, dtype=torch.float64)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        self.sum += (x * x).sum(0)
        self.tokens += x.shape[0]

    @property
    def norms(self) -> torch.Tensor:
        return self.sum.sqrt().float()


class Hessian(Statistic):
    """X^T X over all calibration tokens (the layer-wise OBS Hessian, up to a constant 2/n
    that dampening relative to the mean diagonal makes irrelevant)."""

    name: ClassVar[str] = "hessian"

    def __init__(self, in_features: int) -> None:
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float32)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.sum.addmm_(x.t(), x)
        self.tokens += x.shape[0]


__all__ = ["ColumnSquares", "Hessian", "Statistic"]
