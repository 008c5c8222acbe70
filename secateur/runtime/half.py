"""The unquantized embedding and lm_head of a packed model, kept in float16 at run time.

`save_packed` stores them in float16; loaded as float32 they would be the largest tensor read
per decoded token (smollm2's tied 49152 x 576 head: 113 MB of its ~170 MB at 4 bits).
`Float16Linear` multiplies float32 activations by the float16 rows widened in registers with
float32 accumulation (secateur's AVX2/F16C kernel, else fbgemm's float16 GEMM): half the bytes
of a float32 head, the same logits as a float32 head holding those float16 values up to
summation order. On the AVX2 kernel a tied head reads the embedding's own table, so the model
holds one float16 copy; fbgemm needs its own packed copy.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from secateur.runtime import avx2
from secateur.runtime.base import RuntimeLinear

ROWS_PER_BLOCK = 8192  # fbgemm packs in row blocks so packing never holds a float32 copy of it all


def float16_gemm_available() -> bool:
    if avx2.kernels() is not None:
        return True
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
        weight = weight.to(torch.float16).contiguous()
        self._bytes = weight.numel() * 2
        if avx2.kernels() is not None and self.in_features % 32 == 0:
            self.register_buffer("weight16", weight)  # may be the embedding's table: shared
            self.blocks = None
            return
        self.register_buffer("weight16", None)
        with warnings.catch_warnings():  # torch.ao's deprecation notice, once per block
            warnings.simplefilter("ignore")
            self.blocks = [torch.ops.quantized.linear_prepack_fp16(
                weight[i:i + ROWS_PER_BLOCK].float().contiguous(), None)
                for i in range(0, weight.shape[0], ROWS_PER_BLOCK)]
        self._table = weight  # for dense_weight only; fbgemm's blocks are opaque

    def weight_bytes(self) -> int:
        buffers = sum(b.numel() * b.element_size() for n, b in self.named_buffers()
                      if n != "weight16")
        return self._bytes + buffers

    def opaque_bytes(self) -> int:
        """Memory held outside tensors torch can see (fbgemm's packed blocks)."""
        return 0 if self.blocks is None else self._bytes

    def logical_parameters(self) -> list[torch.Tensor]:
        table = self.weight16 if self.blocks is None else self._table
        return [table] + ([] if self.bias is None else [self.bias])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.blocks is None:
            return avx2.kernels().f16_linear(x, self.weight16, self.bias)
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

    def logical_parameters(self) -> list[torch.Tensor]:
        return [self.weight]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).to(self.dtype)
