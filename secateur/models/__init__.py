"""Architecture adapters and model loading."""

from secateur.models import families as _families  # noqa: F401  (registers the adapters)
from secateur.models.base import (
    AttentionShape,
    ModelAdapter,
    Projection,
    adapter_for,
    register_adapter,
    supported_model_types,
)

__all__ = [
    "AttentionShape",
    "ModelAdapter",
    "Projection",
    "adapter_for",
    "register_adapter",
    "supported_model_types",
]
