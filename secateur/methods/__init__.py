"""Compression methods; importing this package registers every built-in one."""

from secateur.methods import (  # noqa: F401
    blocks,  # depth pruning: BlockPruner
    layers,  # depth pruning: ShortGPT, SLEB
    magnitude,
    sparsegpt,
    structured,  # width pruning
    wanda,
)
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
