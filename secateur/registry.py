"""Every built-in method, found by name.

A method registers itself in its own file (`secateur.methods.base.register_method`); this
module imports each built-in one, so that a name from a recipe, a flag or a sweep finds its
config whatever its caller imported. It sits above `methods/` and `recovery/` (lora, distill
and dwq live beside their training loop): neither imports the other's layer to be found.
"""

from __future__ import annotations

from typing import Any

from secateur.config import MethodConfig, StepKind
from secateur.errors import SecateurError
from secateur.methods import (  # noqa: F401  (each registers itself)
    blocks,
    gguf,
    gptq,
    layers,
    magnitude,
    rtn,
    sparsegpt,
    structured,
    w8a8,
    wanda,
)
from secateur.methods.base import LayerwiseMethod, registered
from secateur.recovery import distill, dwq, lora  # noqa: F401  (each registers itself)


def method_names(kind: StepKind | None = None) -> list[str]:
    return sorted(n for n, (c, _) in registered().items() if kind is None or c.kind == kind)


def config_class(name: str, kind: StepKind | None = None) -> type[MethodConfig]:
    entry = registered().get(name)
    if entry is None or (kind is not None and entry[0].kind != kind):
        raise SecateurError(f"unknown method '{name}': use one of "
                            f"{', '.join(method_names(kind))}")
    return entry[0]


def make_config(data: dict[str, Any], kind: StepKind | None = None) -> MethodConfig:
    """{'method': 'wanda', 'sparsity': 0.5} -> WandaConfig(sparsity=0.5)."""
    if not isinstance(data, dict) or "method" not in data:
        raise SecateurError(f"a step needs a 'method' key naming one of "
                            f"{', '.join(method_names(kind))}; got {data!r}")
    fields = dict(data)
    return config_class(str(fields.pop("method")), kind)(**fields)


def is_layerwise(name: str | None) -> bool:
    """The method `name` works layer by layer (and so checkpoints each finished layer)."""
    entry = registered().get(name or "")
    return entry is not None and issubclass(entry[1], LayerwiseMethod)
