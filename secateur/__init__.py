"""secateur: make causal language models smaller and faster, and prove it.

The public names are imported on first use (PEP 562): `import secateur` stays cheap, so the
command line can set up its Ctrl-C handling before torch and transformers load."""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "CalibrationConfig": "secateur.api",
    "StepResult": "secateur.api",
    "count_parameters": "secateur.api",
    "prune": "secateur.api",
    "quantize": "secateur.api",
    "recover": "secateur.api",
    "run_step": "secateur.api",
    "ConfigError": "secateur.config",
    "MethodConfig": "secateur.config",
    "SecateurError": "secateur.errors",
    "evaluate": "secateur.eval.api",
    "PerplexityConfig": "secateur.eval.config",
    "ZeroShotConfig": "secateur.eval.config",
    "PerplexityResult": "secateur.eval.perplexity",
    "ZeroShotResult": "secateur.eval.zeroshot",
    "BlockPrunerConfig": "secateur.methods",
    "LLMPrunerConfig": "secateur.methods",
    "MagnitudeConfig": "secateur.methods",
    "OWLConfig": "secateur.methods",
    "ShortGPTConfig": "secateur.methods",
    "SLEBConfig": "secateur.methods",
    "SparseGPTConfig": "secateur.methods",
    "WandaConfig": "secateur.methods",
    "Loaded": "secateur.models.loading",
    "load": "secateur.formats.loader",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'secateur' has no attribute '{name}'")
    value = getattr(importlib.import_module(where), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
