"""Pruning masks beside a saved model, for the checkpoints secateur reads back itself.

No saved model holds a mask (`secateur.models.mask`): plain transformers must load it without
unexpected keys. A checkpoint between a recipe's steps is read back by secateur, though, and a
resumed run must go on with the masks the interrupted one had rather than with the zeros taken
for them (which would freeze kept weights that are exactly 0, and change what the model holds).
So such a checkpoint writes them to a file of their own beside the weights, which transformers
never opens, and the loaders put them back where they find one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from secateur.errors import SecateurError
from secateur.models.mask import MASK, mask_keys

FILE = "secateur_masks.safetensors"


def write_masks(model: nn.Module, folder: Path) -> None:
    """The model's masks into `folder`/FILE, under their state_dict names; nothing without
    masks."""
    keys = mask_keys(model)
    if not keys:
        return
    state = model.state_dict()
    save_file({k: state[k].detach().cpu().contiguous() for k in sorted(keys)},
              str(Path(folder) / FILE), metadata={"format": "pt"})


def restore_masks(model: nn.Module, folder: Path) -> None:
    """Register the masks saved in `folder` (if any) on the model's linears."""
    path = Path(folder) / FILE
    if not path.is_file():
        return
    damaged = f"'{path}' does not fit the model beside it: remove it or re-save the model"
    try:
        masks = load_file(str(path))
    except Exception as err:
        raise SecateurError(f"'{path}' is damaged ({type(err).__name__}): remove it or "
                            "re-save the model") from None
    for key, bits in masks.items():
        owner, _, leaf = key.rpartition(".")
        try:
            module = model.get_submodule(owner)
        except AttributeError:
            raise SecateurError(damaged) from None
        weight = getattr(module, "weight", None)
        if leaf != MASK or not isinstance(weight, torch.Tensor) or bits.dtype != torch.uint8 \
                or tuple(bits.shape) != (*weight.shape[:-1], (weight.shape[-1] + 7) // 8):
            raise SecateurError(damaged)
        module.register_buffer(MASK, bits.to(weight.device))
