"""Typed, validated configs: the base every method config derives from, and its errors.

A method is a frozen pydantic model that forbids unknown fields, so a field of another method,
a misspelt field, a wrong type or an out-of-range value fails at construction with one line
that names the field. Each config class names its method and the kind of step it is; the
registry (`secateur.methods.base.register_method`) maps it to the handler that carries it out.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from secateur.errors import SecateurError

StepKind = Literal["prune", "quantize", "recover"]


def one_line(err: ValidationError, owner: str) -> str:
    """pydantic's multi-line report as one line per field, joined: 'owner.field: why'."""
    parts = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "not a field of this method"
        elif "input" in e and not isinstance(e["input"], dict | list):
            msg = f"{msg} (got {e['input']!r})"
        parts.append(f"{owner}.{field}: {msg}" if field else f"{owner}: {msg}")
    return "; ".join(parts)


class ConfigError(SecateurError, ValueError):
    """A config that failed validation; its message is one line naming the field."""


class Config(BaseModel):
    """Frozen, no unknown fields; validation errors become one-line `ConfigError`s."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise ConfigError(one_line(err, type(self).__name__)) from None

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class MethodConfig(Config):
    """One step of a recipe: a prune, quantize or recover method with its settings."""

    method: ClassVar[str]
    kind: ClassVar[StepKind]

    def to_dict(self) -> dict[str, Any]:
        """What a recipe stores: the method name, then only the fields given or changed."""
        return {"method": self.method, **self.model_dump(mode="json", exclude_defaults=True)}

    def settings(self) -> dict[str, Any]:
        """Every field, defaults included: what a result records."""
        return {"method": self.method, **self.model_dump(mode="json")}


def quantizes(config: MethodConfig) -> bool:
    """The step leaves quantized weights (a quantize step, or SparseGPT with a grid)."""
    return config.kind == "quantize" or getattr(config, "quantize", None) is not None
