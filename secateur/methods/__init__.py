"""Compression methods: the contract (`base`) and one file per method, each registering
itself; `secateur.registry` imports every built-in one to find them by name."""

from secateur.methods.base import (
    LayerReport,
    LayerwiseMethod,
    ModelMethod,
    PruneContext,
    build_method,
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
    "register_method",
]
