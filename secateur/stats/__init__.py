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
        self.sum += x.square_().sum(0)  # x is our own float64 copy: square it in place
        self.tokens += x.shape[0]

    @property
    def norms(self) -> torch.Tensor:
        return self.sum.sqrt().float()


class Hessian(Statistic):
    """X^T X over all calibration tokens (the layer-wise OBS Hessian, up to a constant 2/n
    that dampening relative to the mean diagonal makes irrelevant).

    Accumulated in fp32 as panels of the upper triangle (about 60% of a full product's work
    for wide inputs); `sum` mirrors it into the full symmetric matrix when first read."""

    name: ClassVar[str] = "hessian"
    panel: ClassVar[int] = 256

    def __init__(self, in_features: int) -> None:
        self._sum = torch.zeros(in_features, in_features, dtype=torch.float32)
        self._lower_stale = False
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        d, p = x.shape[1], self.panel
        if d <= p:
            self._sum.addmm_(x.t(), x)
        else:
            for i in range(0, d, p):
                self._sum[i:i + p, i:].addmm_(x[:, i:i + p].t(), x[:, i:])
            self._lower_stale = True
        self.tokens += x.shape[0]

    @property
    def sum(self) -> torch.Tensor:
        if self._lower_stale:
            h, p = self._sum, self.panel
            for i in range(0, h.shape[0], p):
                h[i + p:, i:i + p] = h[i:i + p, i + p:].t()
            self._lower_stale = False
        return self._sum

    @sum.setter
    def sum(self, value: torch.Tensor) -> None:  # methods free it with an empty tensor
        self._sum, self._lower_stale = value, False


__all__ = ["ColumnSquares", "Hessian", "Statistic"]
