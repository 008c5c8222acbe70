"""secateur: make causal language models smaller and faster, and prove it."""

from secateur.api import (
    CalibrationConfig,
    StepResult,
    count_parameters,
    prune,
    quantize,
    recover,
    run_step,
)
from secateur.config import ConfigError, MethodConfig
from secateur.errors import SecateurError
from secateur.eval.api import evaluate
from secateur.eval.config import PerplexityConfig, ZeroShotConfig
from secateur.eval.perplexity import PerplexityResult
from secateur.eval.zeroshot import ZeroShotResult
from secateur.methods import (
    BlockPrunerConfig,
    LLMPrunerConfig,
    MagnitudeConfig,
    OWLConfig,
    ShortGPTConfig,
    SLEBConfig,
    SparseGPTConfig,
    WandaConfig,
)
from secateur.models.loading import Loaded, load

__all__ = [
    "BlockPrunerConfig",
    "CalibrationConfig",
    "ConfigError",
    "LLMPrunerConfig",
    "Loaded",
    "MagnitudeConfig",
    "MethodConfig",
    "OWLConfig",
    "PerplexityConfig",
    "PerplexityResult",
    "ZeroShotConfig",
    "ZeroShotResult",
    "evaluate",
    "SLEBConfig",
    "SecateurError",
    "ShortGPTConfig",
    "SparseGPTConfig",
    "StepResult",
    "WandaConfig",
    "count_parameters",
    "load",
    "prune",
    "quantize",
    "recover",
    "run_step",
]
