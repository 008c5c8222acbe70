"""A quantized linear's scheme: what its grid is, without the grid's tensors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class QuantScheme:
    """As compressed-tensors' `quantization_scheme` on a module: hashable, JSON-ready."""

    bits: int
    group_size: int  # -1: one group per output row (per channel)
    symmetric: bool
    actorder: Literal["group", "weight"] | None = None
