"""Counting parameters the way every report here means it: each tensor once, tied ones too."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn


def unique_parameters(modules: Iterable[nn.Module]) -> Iterator[nn.Parameter]:
    """Every parameter of the modules once, however often it is shared (tied embeddings)."""
    seen: set[int] = set()
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                yield p


def logical_parameters(model: nn.Module) -> Iterator[torch.Tensor]:
    """Every parameter once, where modules that hold their weights in a kernel's own layout
    (secateur's runtime linears: packed int4 codes, a float16 head) stand for the parameters
    they replace through `logical_parameters()`: a packed model counts what it computes with."""
    stored = {id(t) for t in list(model.parameters()) + list(model.buffers())}
    seen: set[int] = set()
    replaced: set[int] = set()
    for module in model.modules():
        get = getattr(module, "logical_parameters", None)
        if not callable(get):
            continue
        replaced |= {id(p) for p in module.parameters()}
        for t in get():
            if id(t) in stored:  # a tied head and embedding share one table: count it once
                if id(t) in seen:
                    continue
                seen.add(id(t))
            yield t  # a weight materialised just now is its own
    for p in unique_parameters([model]):
        if id(p) not in seen and id(p) not in replaced:
            yield p


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Unique parameters (packed weights by their logical count), how many of them are
    non-zero, and the bytes the model holds in memory (packed buffers as they are)."""
    total = nonzero = 0
    for p in logical_parameters(model):
        total += p.numel()
        nonzero += int(torch.count_nonzero(p).item())
    return {"parameters": total, "nonzero": nonzero, "bytes_in_memory": _bytes_in_memory(model)}


# the buffer a pruning mask is recorded in (models/mask.py): never saved, so not counted as
# the model's memory (a pruned model would otherwise report more bytes than its dense self)
MASK = "weight_mask_bits"
# the buffers a gguf step keeps llama.cpp's blocks in (quant/ggml_names.py): what the GGUF
# writer packs, beside a weight that already holds their values, so not counted either
GGML_PREFIX = "weight_ggml_"


def _bytes_in_memory(model: nn.Module) -> int:
    buffers = [b for name, b in model.named_buffers()
               if (leaf := name.rsplit(".", 1)[-1]) != MASK and not leaf.startswith(GGML_PREFIX)]
    tensors = {t.data_ptr(): t.numel() * t.element_size()
               for t in list(model.parameters()) + buffers
               if t.device.type != "meta" and t.numel()}
    opaque = sum(getattr(m, "opaque_bytes", lambda: 0)() for m in model.modules())
    return sum(tensors.values()) + opaque


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights a batch-1 decode step reads: every parameter once (dense kernels read
    zeros too), except an untied input embedding, of which one row is read; plus the packed
    buffers of modules that report their own (`weight_bytes()`: secateur's runtime linears)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # a runtime head (an int8 one) has no `weight`: it is then not tied to the embedding
    table = getattr(emb, "weight", None)
    tied = table is not None and table is getattr(out, "weight", None)
    skip = set() if tied or table is None else {id(table)}
    packed = sum(m.weight_bytes() for m in model.modules()
                 if callable(getattr(m, "weight_bytes", None)))
    return packed + sum(p.numel() * p.element_size() for p in unique_parameters([model])
                        if id(p) not in skip)
