"""Compression methods; importing this package registers every built-in one."""

from secateur.methods import magnitude, sparsegpt, wanda  # noqa: F401
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
