"""Architecture adapters and model loading."""

# One file per family; importing each registers its adapter.
from secateur.models import gemma3, gpt2, gpt_neox, llama, opt  # noqa: F401
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
