"""Compression methods; importing this package registers every built-in one."""

from secateur.methods import (  # noqa: F401
    blocks,  # depth pruning: BlockPruner
    gguf,  # quantization into llama.cpp's block types
    gptq,  # quantization
    layers,  # depth pruning: ShortGPT, SLEB
    magnitude,
    rtn,  # quantization: round to nearest
    sparsegpt,
    structured,  # width pruning
    w8a8,  # int8 weights and activations
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

# Recovery steps live beside their training loops; importing them registers them too.
from secateur.recovery import distill as _distill  # noqa: E402, F401
from secateur.recovery import dwq as _dwq  # noqa: E402, F401
from secateur.recovery import lora as _lora  # noqa: E402, F401

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
