"""The unquantized embedding and lm_head of a packed model, kept in float16 at run time.

`save_packed` stores them in float16; loaded as float32 they would be the largest tensor read
per decoded token (smollm2's tied 49152 x 576 head: 113 MB of its ~170 MB at 4 bits). fbgemm's
float16-weight GEMM (`quantized::linear_dynamic_fp16`: float32 activations, float16 weights
widened in registers, float32 accumulation) reads half the bytes and computes the same logits
as the float32 head holding those float16 values, up to summation order. The input embedding
keeps its float16 table and widens the rows it looks up.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from secateur.runtime.base import RuntimeLinear

ROWS_PER_BLOCK = 8192  # packed in row blocks so packing never holds a float32 copy of it all


def float16_gemm_available() -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            packed = torch.ops.quantized.linear_prepack_fp16(torch.ones(1, 8), None)
            torch.ops.quantized.linear_dynamic_fp16(torch.ones(1, 8), packed)
        return True
    except (RuntimeError, AttributeError):
        return False


class Float16Linear(RuntimeLinear):
    weight = None  # no float weight: callers that compare `.weight` identities see none

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__(weight.shape[1], weight.shape[0], bias)
        with warnings.catch_warnings():  # torch.ao's deprecation notice, once per block
            warnings.simplefilter("ignore")
            self.blocks = [torch.ops.quantized.linear_prepack_fp16(
                weight[i:i + ROWS_PER_BLOCK].float().contiguous(), None)
                for i in range(0, weight.shape[0], ROWS_PER_BLOCK)]
        self._bytes = weight.numel() * 2

    def weight_bytes(self) -> int:
        return self._bytes + super().weight_bytes()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x = x.reshape(-1, self.in_features).float()
        outs = [torch.ops.quantized.linear_dynamic_fp16(x, b) for b in self.blocks]
        y = outs[0] if len(outs) == 1 else torch.cat(outs, -1)
        if self.bias is not None:
            y = y + self.bias
        return y.to(dtype).reshape(*shape[:-1], self.out_features)


class Float16Embedding(nn.Module):
    """nn.Embedding's lookup from a float16 table, rows widened to `dtype`."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype,
                 padding_idx: int | None = None) -> None:
        super().__init__()
        self.register_buffer("weight", weight.to(torch.float16).contiguous())
        self.num_embeddings, self.embedding_dim = weight.shape
        self.padding_idx = padding_idx
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).to(self.dtype)
