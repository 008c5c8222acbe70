"""Which weights of a linear are pruned, kept on the linear itself so that it survives training.

A pruned weight is zero, but a zero is not always pruned: a kept weight can be exactly 0, and
quantization rounds small weights to 0 (wherever a code lands on the zero point). Reading the
mask back from `weight == 0` would freeze those for good. So the methods that prune record the
mask, and the quantize methods the mask they found, as a buffer beside the weight, the way the
grids sit beside it (`secateur.quant.state`): it is in the layer's `state_dict`, so layer
checkpoints carry it, and `deepcopy`, `.to()`, peft's wrapping and merging keep it; it is not in
`parameters()`, so no optimizer, parameter count or full fine-tuning sees it. No saved model
holds it (`mask_keys`: the formats leave these keys out, since plain transformers would load
them as unexpected keys).

One bit per weight (1 = kept), packed eight to a byte along the parameter's last dimension, in
the parameter's own layout (GPT-2's Conv1D: (in, out)): a bool per weight would add half the
size of a bfloat16 model's linears to its memory.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from secateur.params import MASK

_WEIGHTS = 2 ** torch.arange(8, dtype=torch.uint8)


def pack_bits(keep: torch.Tensor) -> torch.Tensor:
    """(..., n) bool -> (..., ceil(n / 8)) uint8, bit i of byte j holding column 8j + i."""
    flat = keep.to(torch.uint8)
    pad = -flat.shape[-1] % 8
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    groups = flat.reshape(*flat.shape[:-1], -1, 8)
    return (groups * _WEIGHTS.to(keep.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of `pack_bits` for a last dimension of `n` columns."""
    shifted = bits.unsqueeze(-1) & _WEIGHTS.to(bits.device)
    return (shifted != 0).reshape(*bits.shape[:-1], -1)[..., :n]


def kept_mask(module: nn.Module) -> torch.Tensor | None:
    """True where `module.weight` is kept, in the weight's layout; None where nothing was
    recorded."""
    bits = module._buffers.get(MASK)
    if bits is None or bits.is_meta:
        return None
    return unpack_bits(bits, module.weight.shape[-1])


def set_kept_mask(module: nn.Module, keep: torch.Tensor) -> None:
    """Record `keep` (bool, the weight's shape and layout) on `module`, replacing any mask.

    A mask of the same shape is written into the existing buffer: a distributed run
    broadcasts each solved module's buffers into the tensors every rank already holds."""
    if tuple(keep.shape) != tuple(module.weight.shape):
        raise ValueError(f"mask of shape {tuple(keep.shape)} for a weight of shape "
                         f"{tuple(module.weight.shape)}")
    bits = pack_bits(keep.to(device=module.weight.device, dtype=torch.bool))
    old = module._buffers.get(MASK)
    if old is not None and not old.is_meta and old.shape == bits.shape:
        old.copy_(bits)
    else:
        module.register_buffer(MASK, bits)


def clear_mask(module: nn.Module) -> None:
    module._buffers.pop(MASK, None)


def record_pruned(module: nn.Module, pruned: torch.Tensor) -> None:
    """Add `pruned` (True = pruned) to the module's mask: a weight pruned by an earlier step
    stays pruned even where this step's own mask would keep it."""
    keep = ~pruned
    old = kept_mask(module)
    set_kept_mask(module, keep if old is None else keep & old)


def adopt_masks(modules: Iterable[nn.Module], derive: bool) -> None:
    """Give each module (with a weight in memory) that has no mask one: its exact zeros taken
    as pruned where `derive` (a model read from disk: saved files hold no mask, so its zeros
    are the only record left), else all kept (a model whose pruning was recorded here: a
    module without a mask was never pruned)."""
    for module in modules:
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.is_meta \
                or module._buffers.get(MASK) is not None:
            continue
        keep = weight.detach() != 0 if derive else torch.ones_like(weight, dtype=torch.bool)
        set_kept_mask(module, keep)


def has_masks(model: nn.Module) -> bool:
    return any(module._buffers.get(MASK) is not None for module in model.modules())


def mask_keys(model: nn.Module) -> set[str]:
    """The state_dict keys of every recorded mask: what no saved model holds."""
    return {f"{name}.{MASK}" if name else MASK
            for name, module in model.named_modules() if module._buffers.get(MASK) is not None}


def select_mask(module: nn.Module, keep: torch.Tensor, dim: int) -> None:
    """Follow surgery that kept indices `keep` of the weight's dimension `dim`: call once the
    weight has shrunk."""
    bits = module._buffers.get(MASK)
    if bits is None or bits.is_meta:
        return
    # unpacked with the padding columns, which `keep` never names (it indexes real ones)
    mask = unpack_bits(bits, bits.shape[-1] * 8).index_select(dim, keep.to(bits.device))
    module._buffers.pop(MASK)
    set_kept_mask(module, mask[..., :module.weight.shape[-1]])
