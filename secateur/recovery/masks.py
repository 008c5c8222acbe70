"""Pruning masks that survive recovery: pruned weights stay exactly zero.

`record_masks` reads, before training, the mask each decoder projection carries
(`secateur.models.mask`, recorded by the method that pruned it); `Masks.apply` puts the zeros
back (after a LoRA merge, after every optimizer step of full fine-tuning) and
`Masks.mask_grads` keeps the optimizer from moving them in the first place. A kept weight that
is exactly 0 (rounded there by a quantizer, or by chance) trains like any other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from secateur.models.base import ModelAdapter, get_submodule
from secateur.models.mask import has_masks, kept_mask


@dataclass
class Masks:
    """Parameter name (as in `model.named_parameters()` of the bare model) -> True where the
    weight must stay zero."""

    zero: dict[str, torch.Tensor] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.zero)

    @property
    def count(self) -> int:
        return int(sum(int(m.sum()) for m in self.zero.values()))

    def _pairs(self, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        params = _parameters_by_name(model)
        missing = [name for name in self.zero if name not in params]
        if missing:
            raise ValueError(f"masked parameters not in the model: {missing[:3]}")
        return [(params[name], mask.to(params[name].device)) for name, mask in self.zero.items()]

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Zero every recorded position of `model`'s weights (bare or peft-wrapped)."""
        for param, mask in self._pairs(model):
            param.masked_fill_(mask, 0)

    @torch.no_grad()
    def mask_grads(self, model: nn.Module) -> None:
        for param, mask in self._pairs(model):
            if param.grad is not None:
                param.grad.masked_fill_(mask, 0)

    def summary(self) -> dict[str, int]:
        return {"matrices": len(self.zero), "zeros_kept": self.count}


def _bare_name(name: str) -> str:
    """A peft-wrapped parameter's name in the bare model: 'base_model.model.x.base_layer.w'
    is 'x.w' (peft wraps the root twice and moves each adapted Linear under base_layer)."""
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".")


def _parameters_by_name(model: nn.Module) -> dict[str, torch.Tensor]:
    return {_bare_name(n): p for n, p in model.named_parameters(remove_duplicate=False)}


def projection_modules(adapter: ModelAdapter) -> list[tuple[str, nn.Module]]:
    """(path in its layer, module) of every decoder projection present; a removed attention or
    MLP branch (secateur's own class sets it to None) simply has none."""
    paths = (*adapter.attn_in, adapter.attn_out, *adapter.mlp_in, adapter.mlp_out)
    found = []
    for layer in adapter.layers:
        for path in dict.fromkeys(paths):
            module = get_submodule(layer, path)
            if module is not None:
                found.append((path, module))
    return found


def record_masks(model: nn.Module, adapter: ModelAdapter) -> Masks:
    """The pruned weights of every decoder projection that has any; empty for a dense model."""
    names = {id(p): n for n, p in model.named_parameters()}
    # A model read from disk carries no mask (no saved format holds one): its exact zeros are
    # all that is left of its pruning, so they stand in for the mask, as before masks were
    # recorded. A model pruned or quantized in this process has its masks.
    recorded = has_masks(model)
    found: dict[str, torch.Tensor] = {}
    for _, module in projection_modules(adapter):
        weight = getattr(module, "weight", None)
        if weight is None or id(weight) not in names:
            continue  # a removed branch's stand-in holds no weight
        if recorded:
            keep = kept_mask(module)
            if keep is None:
                continue  # never pruned
            zero = ~keep.to(weight.device)
        else:
            zero = weight.detach() == 0
        if bool(zero.any()):
            found[_bare_name(names[id(weight)])] = zero
    return Masks(found)
