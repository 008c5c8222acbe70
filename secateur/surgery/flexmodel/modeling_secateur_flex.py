"""One causal-LM class for every family, with per-layer widths and removed branches.

Self-contained on purpose (imports only torch and transformers): secateur copies this file next
to the weights and the config's `auto_map` points at it, so
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` loads the model on a machine
without secateur.

Why one generic class rather than one per family: the model IS the family's stock
transformers class (Llama, Mistral, Qwen2/3, Gemma 3, OPT, GPT-2, GPT-NeoX, ...), subclassed
here, so every detail of the family (biases, q/k norms, partial rotary, sliding/full layer
types, embedding scale, softcapping, GPT-2's Conv1D) stays transformers' own code, not a copy
that drifts. After the stock `__init__` built the stock shapes from the stored stock config,
three per-model tables in the config make it the pruned model:

- `secateur_shapes`: `{parameter path: shape}` for every parameter that was shrunk (a
  parameter becomes the leading slice of its stock one; Linear/Conv1D size attributes follow);
- `secateur_attributes`: `{module path.attribute: value}` for the width attributes a family's
  forward reads (e.g. Llama's `num_key_value_groups`, GPT-2's `split_size`, OPT's
  `num_heads`); secateur's adapters say which, so there is no per-family table here;
- `secateur_removed`: `{module path: {"kind": ...}}` where an attention or MLP branch (or an
  MLP projection, for OPT's fc1/fc2) was removed: a weightless stand-in that adds zero.

A removed attention branch still records its tokens in the KV cache (one tiny head of ones),
so layer indices stay the stock ones, Gemma 3's per-layer sliding/full cache layers keep their
types, and the cache's token count (read from layer 0) stays right when layer 0's attention
is gone.

Class names are `Pruned` + the stock class name (`PrunedQwen2Config`,
`PrunedQwen2ForCausalLM`), built on first access by this module's `__getattr__`, which is
how `auto_map` entries resolve. `base_model_type` in the config names the stock family.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from torch import nn

MODEL_TYPE = "secateur"
PREFIX = "Pruned"
SPEC_KEYS = ("base_model_type", "secateur_shapes", "secateur_attributes", "secateur_removed")


# -- stand-ins for removed branches ----------------------------------------------------------
class RemovedAttention(nn.Module):
    """Stands where an attention branch was: no weights, adds zero to the residual stream."""

    def __init__(self, layer_idx: int | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cache = next((kwargs[k] for k in ("cache", "past_key_values", "layer_past")
                      if kwargs.get(k) is not None), None)
        if cache is not None and self.layer_idx is not None and hasattr(cache, "update"):
            # Ones, not zeros: static caches count filled positions by nonzero entries.
            token = hidden.new_ones(hidden.shape[0], 1, hidden.shape[1], 1)
            cache.update(token, token, self.layer_idx)
        return torch.zeros_like(hidden), None


class RemovedMLP(nn.Module):
    """Stands where an MLP branch was: no weights, adds zero to the residual stream."""

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros_like(hidden)


class RemovedProjection(nn.Module):
    """For an MLP that is not one module (OPT's fc1/fc2 sit on the layer itself)."""

    def __init__(self, out_features: int = 0) -> None:
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


STAND_INS: dict[str, type[nn.Module]] = {"attention": RemovedAttention, "mlp": RemovedMLP,
                                         "projection": RemovedProjection}


def stand_in_record(module: nn.Module) -> dict[str, Any] | None:
    """What the config stores for a stand-in (None for any other module)."""
    if isinstance(module, RemovedAttention):
        return {"kind": "attention"}
    if isinstance(module, RemovedMLP):
        return {"kind": "mlp"}
    if isinstance(module, RemovedProjection):
        return {"kind": "projection", "out_features": module.out_features}
    return None


def _make_stand_in(record: dict[str, Any], replaced: nn.Module) -> nn.Module:
    if record["kind"] == "attention":
        return RemovedAttention(getattr(replaced, "layer_idx", None))
    if record["kind"] == "projection":
        return RemovedProjection(int(record.get("out_features", 0)))
    return RemovedMLP()


# -- applying the stored spec ----------------------------------------------------------------
def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _resize(module: nn.Module, leaf: str, shape: list[int]) -> None:
    old = getattr(module, leaf)
    if any(s > o for s, o in zip(shape, old.shape, strict=True)):
        raise ValueError(f"{leaf} of shape {tuple(old.shape)} cannot grow to {tuple(shape)}")
    kept = old.data[tuple(slice(0, s) for s in shape)].clone()
    setattr(module, leaf, nn.Parameter(kept, requires_grad=old.requires_grad))
    if leaf != "weight":
        return
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = shape
    elif hasattr(module, "nf"):  # transformers' Conv1D keeps its weight as (in, out)
        module.nx, module.nf = shape


def apply_spec(model: nn.Module, config: Any) -> None:
    """Turn a freshly built stock model into the pruned one the config describes."""
    for path, record in (getattr(config, "secateur_removed", None) or {}).items():
        _set_submodule(model, path, _make_stand_in(record, model.get_submodule(path)))
    for name, shape in (getattr(config, "secateur_shapes", None) or {}).items():
        path, _, leaf = name.rpartition(".")
        _resize(model.get_submodule(path), leaf, list(shape))
    for name, value in (getattr(config, "secateur_attributes", None) or {}).items():
        path, _, attr = name.rpartition(".")
        setattr(model.get_submodule(path), attr, value)


# -- the classes -----------------------------------------------------------------------------
class SecateurConfigMixin:
    """The stock config plus the three tables above and the stock family's model type."""

    def auto_map_entries(self) -> dict[str, str]:
        module = __name__.rpartition(".")[2]
        config_cls, model_cls = flex_classes(self.base_model_type)
        return {"AutoConfig": f"{module}.{config_cls.__name__}",
                "AutoModelForCausalLM": f"{module}.{model_cls.__name__}"}


class SecateurModelMixin:
    """The stock causal LM, reshaped by `apply_spec` right after the stock `__init__`."""

    _auto_class = "AutoModelForCausalLM"

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        apply_spec(self, config)


_BUILT: dict[str, tuple[type, type]] = {}


def flex_classes(base_model_type: str) -> tuple[type, type]:
    """(config class, causal-LM class) of secateur's generic model for one stock family."""
    if base_model_type not in _BUILT:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        stock_config = CONFIG_MAPPING[base_model_type]
        stock_model = MODEL_FOR_CAUSAL_LM_MAPPING[stock_config]
        config_cls = type(f"{PREFIX}{stock_config.__name__}", (SecateurConfigMixin, stock_config), {
            "__module__": __name__,
            "__annotations__": {k: "Any" for k in SPEC_KEYS},
            "model_type": MODEL_TYPE,
            "_auto_class": "AutoConfig",
            "base_model_type": base_model_type,
            "secateur_shapes": None,
            "secateur_attributes": None,
            "secateur_removed": None,
        })
        model_cls = type(f"{PREFIX}{stock_model.__name__}", (SecateurModelMixin, stock_model), {
            "__module__": __name__,
            "config_class": config_cls,
        })
        _BUILT[base_model_type] = (config_cls, model_cls)
    return _BUILT[base_model_type]


def __getattr__(name: str) -> type:
    """`PrunedQwen2Config` / `PrunedQwen2ForCausalLM`: how `auto_map` finds the classes."""
    stock = getattr(transformers, name[len(PREFIX):], None) if name.startswith(PREFIX) else None
    if stock is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    base = stock.config_class.model_type if hasattr(stock, "config_class") else stock.model_type
    config_cls, model_cls = flex_classes(base)
    return config_cls if name == config_cls.__name__ else model_cls
