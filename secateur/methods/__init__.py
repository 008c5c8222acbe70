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
    build_method,
    config_class,
    make_config,
    method_names,
    register_method,
)
from secateur.methods.blocks import BlockPrunerConfig
from secateur.methods.layers import ShortGPTConfig, SLEBConfig
from secateur.methods.magnitude import MagnitudeConfig
from secateur.methods.sparsegpt import SparseGPTConfig
from secateur.methods.sparsity import OWLConfig
from secateur.methods.structured import LLMPrunerConfig
from secateur.methods.wanda import WandaConfig

__all__ = [
    "BlockPrunerConfig",
    "LLMPrunerConfig",
    "LayerReport",
    "LayerwiseMethod",
    "MagnitudeConfig",
    "ModelMethod",
    "OWLConfig",
    "PruneContext",
    "SLEBConfig",
    "ShortGPTConfig",
    "SparseGPTConfig",
    "WandaConfig",
    "build_method",
    "config_class",
    "make_config",
    "method_names",
    "register_method",
]
