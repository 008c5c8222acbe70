"""Depth surgery: remove whole decoder layers, or a layer's attention or MLP residual branch.

A whole layer leaves the `ModuleList`; the config then says fewer layers (and per-layer lists
such as Gemma 3's `layer_types` keep the survivors' entries), and every module's `layer_idx`
is renumbered so the KV cache indexes the layers that remain. That model is a stock config and
reloads with `AutoModelForCausalLM` alone.

A single branch is replaced by a parameter-free stand-in that adds nothing to the residual
stream, so its weights are gone (not zeroed) and the model still runs. The stand-ins are the
ones secateur's generic class rebuilds on load (`flexmodel/modeling_secateur_flex.py`), and
the model becomes that class (`surgery/flex.py`): its config records which layers lack which
branch, and it saves with `auto_map` for every family.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from secateur.errors import SecateurError
from secateur.models.base import ModelAdapter, get_submodule
from secateur.params import unique_parameters
from secateur.surgery.flexmodel.modeling_secateur_flex import (
    RemovedAttention,
    RemovedMLP,
    RemovedProjection,
)

PARTS = ("attn", "mlp", "layer")


@dataclass(frozen=True, order=True)
class Block:
    """One removable unit: a layer's attention branch, its MLP branch, or the whole layer."""

    layer: int
    part: str

    def __post_init__(self) -> None:
        if self.part not in PARTS:
            raise ValueError(f"block part must be one of {PARTS}, got {self.part!r}")

    def __str__(self) -> str:
        return f"{self.layer}.{self.part}"

    @classmethod
    def parse(cls, text: str) -> Block:
        layer, _, part = text.partition(".")
        return cls(int(layer), part)


# The stand-ins live in the self-contained file saved with the weights, so the model in
# memory and the one reloaded without secateur run the same code.
__all__ = ["RemovedAttention", "RemovedMLP", "RemovedProjection"]


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def branch_paths(adapter: ModelAdapter, part: str) -> list[str]:
    """Module paths (inside a layer) that hold one branch, derived from the adapter's
    declarations: the parent of the output projection when it has one, else the projections."""
    if part == "attn":
        return [_parent(adapter.attn_out)]
    if part == "mlp":
        parent = _parent(adapter.mlp_out)
        return [parent] if parent else [*adapter.mlp_in, adapter.mlp_out]
    raise ValueError(f"no branch called {part!r}")


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _stand_in(adapter: ModelAdapter, layer: nn.Module, part: str, path: str) -> nn.Module:
    if part == "attn":
        # keeps the cache slot of the attention it replaces (see RemovedAttention)
        return RemovedAttention(getattr(layer.get_submodule(path), "layer_idx", None))
    if path == _parent(adapter.mlp_out) and path:
        return RemovedMLP()
    # An MLP made of projections on the layer itself: inputs go to width 0, output to zeros.
    out = adapter.mlp_output(layer).out_features if path == adapter.mlp_out else 0
    return RemovedProjection(out)


def has_branch(adapter: ModelAdapter, index: int, part: str) -> bool:
    """False where a branch is already gone (secateur's own class stores None there)."""
    layer = adapter.layers[index]
    return not any(get_submodule(layer, p) is None for p in branch_paths(adapter, part)) and \
        not branch_removed(adapter, layer, part)


def branch_removed(adapter: ModelAdapter, layer: nn.Module, part: str) -> bool:
    return all(isinstance(layer.get_submodule(p), RemovedAttention | RemovedMLP |
                          RemovedProjection) for p in branch_paths(adapter, part))


def swap_branch(adapter: ModelAdapter, layer: nn.Module, part: str) -> list[tuple[str, nn.Module]]:
    """Put stand-ins in place of a branch; returns what was there so it can be put back."""
    saved = []
    for path in branch_paths(adapter, part):
        saved.append((path, layer.get_submodule(path)))
        _set_submodule(layer, path, _stand_in(adapter, layer, part, path))
    return saved


def restore_branch(layer: nn.Module, saved: list[tuple[str, nn.Module]]) -> None:
    for path, module in saved:
        _set_submodule(layer, path, module)


def _unique_numel(modules: Iterable[nn.Module]) -> int:
    return sum(p.numel() for p in unique_parameters(modules))


def total_parameters(model: nn.Module) -> int:
    """Every parameter once (tied embeddings once): the denominator of depth ratios."""
    return _unique_numel([model])


def block_parameters(adapter: ModelAdapter, block: Block) -> int:
    """Parameters that removing `block` deletes (norms stay with a layer that keeps a branch)."""
    layer = adapter.layers[block.layer]
    if block.part == "layer":
        return _unique_numel([layer])
    return _unique_numel(layer.get_submodule(p) for p in branch_paths(adapter, block.part))


def check_blocks(adapter: ModelAdapter, blocks: Iterable[Block]) -> list[Block]:
    blocks = list(blocks)
    n = adapter.num_layers
    for b in blocks:
        if not 0 <= b.layer < n:
            raise SecateurError(f"block {b} names layer {b.layer}, but the model has layers "
                                f"0..{n - 1}")
    if len(set(blocks)) != len(blocks):
        raise SecateurError("the same block is listed twice for removal")
    return blocks


def normalize_blocks(blocks: Iterable[Block]) -> tuple[list[int], list[Block]]:
    """Whole layers to drop (a layer that loses both branches is dropped whole) and the branch
    removals that remain on surviving layers."""
    parts: dict[int, set[str]] = {}
    for b in blocks:
        parts.setdefault(b.layer, set()).add(b.part)
    whole = sorted(i for i, p in parts.items() if "layer" in p or {"attn", "mlp"} <= p)
    branches = sorted(Block(i, part) for i, p in parts.items() if i not in whole for part in p)
    return whole, branches


def _renumber_layer_idx(layer: nn.Module, index: int) -> None:
    # The KV cache is indexed by `layer_idx`; a gap would make generation read the wrong
    # layer's cache (or run past its end).
    for module in layer.modules():
        if hasattr(module, "layer_idx") and isinstance(module.layer_idx, int):
            module.layer_idx = index


def remove_layers(model: nn.Module, adapter: ModelAdapter, indices: Iterable[int]) -> list[int]:
    """Delete whole decoder layers in place; returns the surviving layers' original indices."""
    drop = set(indices)
    n = adapter.num_layers
    bad = [i for i in drop if not 0 <= i < n]
    if bad:
        raise SecateurError(f"cannot remove layer(s) {sorted(bad)}: the model has layers "
                            f"0..{n - 1}")
    if len(drop) >= n:
        raise SecateurError(f"cannot remove all {n} decoder layers: at least one must remain")
    keep = [i for i in range(n) if i not in drop]
    layers = adapter.layers
    survivors = [layers[i] for i in keep]
    layer_types = getattr(model.config, "layer_types", None)
    new_list = nn.ModuleList(survivors)
    _set_submodule(model, adapter.layers_path, new_list)
    adapter.set_num_layers(len(keep))
    if layer_types is not None:
        model.config.layer_types = [layer_types[i] for i in keep]
    for new_index, layer in enumerate(survivors):
        _renumber_layer_idx(layer, new_index)
    return keep


def remove_branches(model: nn.Module, adapter: ModelAdapter, blocks: Iterable[Block]) -> None:
    """Replace attention/MLP branches by weightless stand-ins, in place."""
    for b in blocks:
        if b.part == "layer":
            raise ValueError("remove_branches takes attention/MLP blocks; use remove_layers")
        layer = adapter.layers[b.layer]
        if branch_removed(adapter, layer, b.part):
            continue
        swap_branch(adapter, layer, b.part)


def remove_blocks(model: nn.Module, adapter: ModelAdapter, blocks: Iterable[Block],
                  in_memory_only: bool = False) -> dict:
    """Remove blocks named by their indices in the unpruned model, in place; whole layers first.

    Whole layers leave a stock config. Single branches turn the model into secateur's generic
    class (saved with `auto_map`), unless `in_memory_only`: then the stand-ins stay in the
    stock class, which runs but does not save.
    Returns the layers dropped, the branch removals (new layer indices) and the config kind.
    """
    blocks = check_blocks(adapter, blocks)
    whole, branches = normalize_blocks(blocks)
    keep = remove_layers(model, adapter, whole) if whole else list(range(adapter.num_layers))
    position = {old: new for new, old in enumerate(keep)}
    renamed = [Block(position[b.layer], b.part) for b in branches]
    remove_branches(model, adapter, renamed)
    if renamed and not in_memory_only or adapter.heterogeneous_class:
        from secateur.surgery.flex import to_flex

        to_flex(model, adapter)  # also refreshes the record of a model already converted
        kind = model.config.model_type
    else:
        kind = "stock" if not renamed else "in-memory only"
    return {"layers_removed": whole, "branches_removed": [str(b) for b in renamed],
            "config": kind}
