"""The lm_head's format in a runtime model: float16 (as stored) or rounded to int8 per row.

Why an 8-bit head: a 4-bit model keeps its embedding and lm_head in float16 (quantizing the
table a token looks up costs quality for no speed), but at batch-1 decode the head is read whole
for every token: smollm2's 49152 x 576 float16 head is 56 MB of the ~120 MB read per token, ~25%
of a token's time at 1 thread here. Rounding it to int8 with one scale per row (symmetric,
round to nearest: what llama.cpp's Q8_0 output tensor and llm-compressor's W8A16 lm_head do)
halves those bytes. It changes the logits (it is a quantization, opt-in, measured in
bench/quantization.py); the embedding keeps its float16 table, so a tied model holds both.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from secateur.errors import SecateurError
from secateur.runtime.int8 import Int8Linear

Head = Literal["float16", "int8"]
HEADS: tuple[str, ...] = ("float16", "int8")
HEAD_ATTR = "secateur_head"  # on the model: the format its lm_head runs in


def check_head(head: str) -> None:
    if head not in HEADS:
        raise SecateurError(f"unknown head format '{head}': use one of {', '.join(HEADS)}")


def int8_rows(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Linear:
    """`weight` (out, in) rounded to int8 with one symmetric scale per row."""
    w = weight.float()
    scale = w.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
    codes = torch.round(w / scale).clamp_(-127, 127) + 128
    return Int8Linear.from_codes(codes.to(torch.int16), scale,
                                 torch.full_like(scale, 128.0), 8, bias, "lm_head")


def _head_weight(head: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    from secateur.runtime.half import Float16Linear

    if isinstance(head, Float16Linear):
        return head.logical_parameters()[0], head.bias
    if isinstance(head, nn.Linear):
        return head.weight, head.bias
    raise SecateurError(f"the lm_head is a {type(head).__name__}: an int8 head replaces a "
                        "float (or float16 runtime) linear only")


@torch.no_grad()
def apply_head(model: nn.Module, head: Head) -> nn.Module:
    """Put the model's output embedding in `head` format, in place (float16: as it is)."""
    check_head(head)
    if head == "int8":
        out = model.get_output_embeddings()
        if out is None:
            raise SecateurError("the model has no output embedding (lm_head) to quantize")
        # the module object is swapped, not its weight: the input embedding keeps its table;
        # the int8 kernel computes in float32 and returns the activations' dtype
        model.set_output_embeddings(int8_rows(*_head_weight(out)))
    setattr(model, HEAD_ATTR, head)
    return model
