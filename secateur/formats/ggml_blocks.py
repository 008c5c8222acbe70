"""llama.cpp's block codes beside a saved model, for the checkpoints secateur reads back itself.

A linear rounded into llama.cpp's block types keeps its codes, scales and importance matrix as
`weight_ggml_*` buffers with a `GGMLScheme` (`secateur.quant.ggml`); no Hugging Face folder
holds them (plain transformers would find unexpected keys), and the GGUF file is written only
at the end. A checkpoint between a recipe's steps must bring them back, or a resumed run would
round again. So such a checkpoint writes them to a safetensors file of their own, under their
state_dict names, with each module's scheme in the file's metadata; the loaders put them back
where they find one.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from secateur.errors import SecateurError
from secateur.quant.ggml import GGMLScheme, ggml_scheme, set_ggml_scheme
from secateur.quant.ggml_names import ggml_keys

FILE = "secateur_ggml.safetensors"


def write_blocks(model: nn.Module, folder: Path) -> None:
    """The model's block buffers into `folder`/FILE; nothing for a model without any."""
    keys = ggml_keys(model)
    if not keys:
        return
    state = model.state_dict()
    owners = sorted({k.rpartition(".")[0] for k in keys})
    schemes = {o: asdict(ggml_scheme(model.get_submodule(o))) for o in owners}
    # clones: a simple type's scale column is a view of its `d` field, and safetensors
    # refuses tensors that share memory
    save_file({k: state[k].detach().cpu().clone() for k in sorted(keys)},
              str(Path(folder) / FILE),
              metadata={"format": "pt", "schemes": json.dumps(schemes)})


def restore_blocks(model: nn.Module, folder: Path) -> None:
    """Register the block buffers and schemes saved in `folder` (if any) on the model."""
    path = Path(folder) / FILE
    if not path.is_file():
        return
    damaged = f"'{path}' does not fit the model beside it: remove it or re-save the model"
    try:
        with safe_open(str(path), "pt") as f:
            schemes = json.loads(f.metadata()["schemes"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as err:
        raise SecateurError(f"'{path}' is damaged ({type(err).__name__}): remove it or "
                            "re-save the model") from None
    by_owner: dict[str, dict[str, object]] = {}
    for key, tensor in tensors.items():
        owner, _, leaf = key.rpartition(".")
        by_owner.setdefault(owner, {})[leaf] = tensor
    if set(by_owner) != set(schemes):
        raise SecateurError(damaged)
    for owner, buffers in by_owner.items():
        try:
            module = model.get_submodule(owner)
            weight = module.weight
            set_ggml_scheme(module, GGMLScheme(**schemes[owner]),
                            {k: v.to(weight.device) for k, v in buffers.items()})
        except (AttributeError, TypeError, SecateurError):
            raise SecateurError(damaged) from None
