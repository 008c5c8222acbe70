"""Compression methods; importing this package registers every built-in one."""

from secateur.methods import magnitude, sparsegpt, wanda  # noqa: F401
from secateur.methods import structured  # noqa: F401  (width pruning)
from secateur.methods import blocks, layers  # noqa: F401  (depth pruning)
from secateur.methods.base import (
    LayerReport,
    LayerwiseMethod,
    ModelMethod,
    PruneContext,
    PruneOptions,
    build_method,
    method_names,
    register_method,
)

__all__ = [
    "LayerReport",
    "LayerwiseMethod",
    "ModelMethod",
    "PruneContext",
    "PruneOptions",
    "build_method",
    "method_names",
    "register_method",
]
