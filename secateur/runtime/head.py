"""The lm_head's format in a runtime model: float16 (as stored) or rounded to int8 per row.

Why an 8-bit head: a 4-bit model keeps its embedding and lm_head in float16, but at batch-1
decode the head is read whole for every token: smollm2's 49152 x 576 float16 head is 56 MB of
the ~120 MB read per token, ~25% of a token's time at 1 thread here. Rounding it to int8 with
one scale per row (symmetric, round to nearest: llama.cpp's Q8_0 output tensor, llm-compressor's
W8A16 lm_head) halves those bytes. It changes the logits: opt-in, measured in
bench/quantization.py. A tied table (one matrix for the embedding and the head) becomes one
int8 table for both, as llama.cpp stores a tied Q8_0 token_embd: the lookup widens the rows it
reads, and the float16 table is not kept (it would be more memory than the int8 one saves).
An untied embedding keeps its own table.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from secateur.errors import SecateurError
from secateur.runtime.half import Float16Embedding, Float16Linear
from secateur.runtime.int8 import Int8Linear

Head = Literal["float16", "int8"]
HEADS: tuple[str, ...] = ("float16", "int8")


def _known(head: str) -> None:
    if head not in HEADS:
        raise SecateurError(f"unknown head format '{head}': use one of {', '.join(HEADS)}")


def check_head(head: str, runtime: str | None) -> None:
    """A known head format, and a runtime to run it in unless it is the stored one."""
    _known(head)
    if head != "float16" and runtime is None:
        raise SecateurError(f"head='{head}' is a runtime's lm_head format: give runtime "
                            "('int4' or 'int8') with it")


ROWS_PER_BLOCK = 4096  # rounded a block at a time: no float32 copy of the whole table


def int8_rows(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Linear:
    """`weight` (out, in) rounded to int8 with one symmetric scale per row."""
    out_f, in_f = weight.shape
    codes = torch.empty(out_f, in_f, dtype=torch.int8)
    scale = torch.empty(out_f)
    for i in range(0, out_f, ROWS_PER_BLOCK):
        w = weight[i:i + ROWS_PER_BLOCK].float()
        s = w.abs().amax(1).clamp_min(1e-12) / 127
        codes[i:i + ROWS_PER_BLOCK] = torch.round(w / s[:, None]).clamp_(-127, 127)
        scale[i:i + ROWS_PER_BLOCK] = s
    return Int8Linear(codes, scale, None, bias)


class Int8Embedding(nn.Module):
    """Lookups in a tied head's int8 table: rows widened to `dtype` and scaled."""

    def __init__(self, head: Int8Linear, dtype: torch.dtype,
                 padding_idx: int | None = None) -> None:
        super().__init__()
        # the head's own tensors (one table in memory); weight_bytes is not defined: a token
        # reads one row, which weight_bytes_per_token does not count for an embedding
        self.register_buffer("weight_int8", head.weight_int8)
        self.register_buffer("scale", head.scale)
        self.num_embeddings, self.embedding_dim = head.weight_int8.shape
        self.padding_idx = padding_idx
        self.dtype = dtype

    def logical_parameters(self) -> list[torch.Tensor]:
        return []  # the head counts the shared table once

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight_int8).to(torch.float32)
        return (rows * F.embedding(ids, self.scale[:, None])).to(self.dtype)


def _head_weight(head: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(head, Float16Linear):
        return head.logical_parameters()[0], head.bias
    if isinstance(head, nn.Linear):
        return head.weight, head.bias
    raise SecateurError(f"the lm_head is a {type(head).__name__}: an int8 head replaces a "
                        "float (or float16 runtime) linear only")


@torch.no_grad()
def apply_head(model: nn.Module, head: Head) -> nn.Module:
    """Put the model's output embedding in `head` format, in place: "float16" leaves it as
    the model holds it (float16 in a packed directory), "int8" rounds it per row."""
    _known(head)
    if head == "int8":
        out = model.get_output_embeddings()
        if out is None:
            raise SecateurError("the model has no output embedding (lm_head) to quantize")
        weight, bias = _head_weight(out)
        emb = model.get_input_embeddings()
        table = getattr(emb, "weight", None)
        shared = (table is not None and table.shape == weight.shape
                  and table.data_ptr() == weight.data_ptr())
        # the int8 kernel computes in float32 and returns the activations' dtype
        head_module = int8_rows(weight, bias)
        model.set_output_embeddings(head_module)
        # only a plain lookup is replaced: a scaled embedding (Gemma's) computes more than one
        if shared and type(emb) in (nn.Embedding, Float16Embedding):
            dtype = getattr(emb, "dtype", table.dtype)
            model.set_input_embeddings(Int8Embedding(head_module, dtype, emb.padding_idx))
    return model
