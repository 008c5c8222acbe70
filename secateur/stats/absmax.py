"""Per-column max |x| of a projection's inputs: SmoothQuant's activation statistic."""

from __future__ import annotations

from typing import ClassVar

import torch

from secateur.stats import Statistic


class ColumnAbsMax(Statistic):
    """max over tokens of |x_j| per input column (SmoothQuant's max(|X_j|))."""

    name: ClassVar[str] = "column_absmax"

    def __init__(self, in_features: int) -> None:
        self.max = torch.zeros(in_features, dtype=torch.float32)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        torch.maximum(self.max, x.detach().abs().amax(0).float(), out=self.max)
        self.tokens += x.shape[0]
