"""Turn a pruned model of any family into secateur's generic class, so it saves and reloads.

The in-memory model keeps its modules and weights; its class becomes the family's
`Pruned<Stock>ForCausalLM` (a subclass of the stock class, see
`flexmodel/modeling_secateur_flex.py`) and its config records what differs from the stock
model the config describes: shrunk parameters, width attributes, removed branches. Those are
found by comparing with the stock model built on the meta device, so no family rules live here
beyond the adapter's list of width attributes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from secateur.errors import SecateurError
from secateur.models.base import FLEX_MODEL_TYPE, ModelAdapter
from secateur.surgery.flexmodel.modeling_secateur_flex import (
    SPEC_KEYS,
    flex_classes,
    stand_in_record,
)

# Keys of a config dict that describe the file, not the model.
_NOT_MODEL = ("model_type", "architectures", "auto_map", "transformers_version")


def stock_config(config: Any) -> Any:
    """The stock config a (possibly already converted) model's config starts from."""
    if config.model_type != FLEX_MODEL_TYPE:
        return config
    from transformers import AutoConfig

    data = {k: v for k, v in config.to_dict().items() if k not in (*SPEC_KEYS, *_NOT_MODEL)}
    stock = AutoConfig.for_model(config.base_model_type, **data)
    stock._attn_implementation = config._attn_implementation
    return stock


def _reference(stock: Any) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(stock)


def flex_spec(model: nn.Module, adapter: ModelAdapter, stock: Any) -> dict[str, Any]:
    """What differs between `model` and the stock model `stock` describes."""
    ref = _reference(stock)
    ref_params = dict(ref.named_parameters())
    removed: dict[str, dict] = {}
    for name, module in model.named_modules():
        record = stand_in_record(module)
        if record is not None:
            removed[name] = record
    shapes: dict[str, list[int]] = {}
    for name, param in model.named_parameters():
        want = ref_params.get(name)
        if want is None:
            raise SecateurError(f"cannot save parameter '{name}': the stock "
                                f"'{stock.model_type}' model has no such parameter")
        if tuple(want.shape) != tuple(param.shape):
            shapes[name] = list(param.shape)
    attributes: dict[str, Any] = {}
    for i, layer in enumerate(adapter.layers):
        ref_layer = ref.get_submodule(adapter.layers_path)[i]
        for path in adapter.width_attributes:
            owner, _, attr = path.rpartition(".")
            mine, theirs = layer.get_submodule(owner), ref_layer.get_submodule(owner)
            if stand_in_record(mine) is not None or not hasattr(mine, attr):
                continue
            if getattr(mine, attr) != getattr(theirs, attr):
                attributes[f"{adapter.layers_path}.{i}.{path}"] = getattr(mine, attr)
    return {"secateur_shapes": shapes, "secateur_attributes": attributes,
            "secateur_removed": removed}


def to_flex(model: nn.Module, adapter: ModelAdapter) -> nn.Module:
    """Retype `model` in place as secateur's generic class for its family; returns it.

    Idempotent: a model already converted gets its spec recomputed (after more pruning)."""
    old = model.config
    stock = stock_config(old)
    spec = flex_spec(model, adapter, stock)
    config_cls, model_cls = flex_classes(stock.model_type)
    data = {k: v for k, v in stock.to_dict().items() if k not in _NOT_MODEL}
    config = config_cls(**data, **spec)
    config._attn_implementation = old._attn_implementation
    config.architectures = [model_cls.__name__]
    config.auto_map = config.auto_map_entries()
    for module in model.modules():
        if getattr(module, "config", None) is old:
            module.config = config
    model.__class__ = model_cls
    # transformers renames some checkpoint keys on load and back on save, by stock class
    # name (GPT-NeoX's embed_out -> lm_head); secateur's class loads the module names as they
    # are, so it must save them as they are
    model.__dict__.pop("_weight_conversions", None)
    adapter.config = config
    return model
