"""8-bit linears on CPU: weight-only (secateur's AVX2 kernel, else `aten._weight_int8pack_mm`)
and W8A8 (`torch._int_mm`).

Weight-only: int8 weights, one scale per output row, float activations. secateur's grid is
w = (q - z) * s; the kernel computes x @ (w8 * s)^T, so the weight is stored as w8 = q - o
with o an integer offset that keeps w8 in int8 (z itself when it is an integer and the codes
have at most 7 bits, else 128), and x.sum() * (o - z) * s is added when o != z.

W8A8: the activations are quantized too, per token and at run time: s_x = max|x| / 127,
x8 = round(x / s_x), y = (x8 @ w8^T) * s_x * s_w with the int8 x int8 -> int32 product of
`torch._int_mm`. The weights must be symmetric (z = 128 for 8 bits), or the product would need
a zero-point correction per token. A model quantized for W8A8 but still dense in memory
simulates exactly this rounding with a forward pre-hook (`mark_w8a8`), so the numbers secateur
measures before conversion are the ones the int8 kernels give.
"""

from __future__ import annotations

import torch
from torch import nn

from secateur.errors import SecateurError
from secateur.quant.scheme import INT8_RUNTIME, W8A8, Accepts, QuantScheme
from secateur.quant.state import ACT_ATTR, INT8_TOKEN
from secateur.runtime import avx2
from secateur.runtime.base import RuntimeLinear


def token_scales(x: torch.Tensor) -> torch.Tensor:
    return x.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 127


def fake_quantize_tokens(x: torch.Tensor) -> torch.Tensor:
    """What per-token int8 quantization does to x, in x's dtype."""
    scale = token_scales(x.float())
    return (torch.round(x.float() / scale) * scale).to(x.dtype)


def _fake_quant_hook(_module: nn.Module, args: tuple) -> tuple:
    return (fake_quantize_tokens(args[0]), *args[1:])


def mark_w8a8(linear: nn.Module) -> None:
    """Quantize this linear's inputs per token at run time (simulated until converted)."""
    if getattr(linear, ACT_ATTR, None) == INT8_TOKEN:
        return
    setattr(linear, ACT_ATTR, INT8_TOKEN)
    linear.register_forward_pre_hook(_fake_quant_hook)


def _refuse(accepts: Accepts, name: str, bits: int, scale: torch.Tensor,
            symmetric: bool = True) -> None:
    problem = accepts.refusal(name, QuantScheme(bits, -1, symmetric), int(scale.shape[1]))
    if problem is not None:
        raise SecateurError(problem)


class Int8Linear(RuntimeLinear):
    def __init__(self, weight: torch.Tensor, scale: torch.Tensor,
                 correction: torch.Tensor | None, bias: torch.Tensor | None = None) -> None:
        super().__init__(weight.shape[1], weight.shape[0], bias)
        self.register_buffer("weight_int8", weight)
        self.register_buffer("scale", scale)
        self.register_buffer("correction", correction)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   bits: int, bias: torch.Tensor | None = None,
                   name: str = "linear") -> Int8Linear:
        """`codes` (out, in) in [0, 2**bits - 1]; `scale`, `zero` (out, 1)."""
        _refuse(INT8_RUNTIME, name, bits, scale)
        scale, zero = scale[:, 0].float(), zero[:, 0].float()
        integral = bool((zero == zero.round()).all())
        offset = zero if bits <= 7 and integral else torch.full_like(zero, 128.0)
        weight = (codes.to(torch.int16) - offset.to(torch.int16)[:, None]).to(torch.int8)
        correction = (offset - zero) * scale
        keep = bool(correction.abs().max() > 0)
        return cls(weight.contiguous(), scale, correction if keep else None, bias)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        kernels = avx2.kernels()
        if kernels is None or self.in_features % 32:
            return torch.ops.aten._weight_int8pack_mm(x, self.weight_int8, self.scale)
        x, scale = x.float().contiguous(), self.scale.float()
        if x.shape[0] <= avx2.GEMV_ROWS:
            return kernels.int8_mm(x, self.weight_int8, scale)
        return x @ (self.weight_int8.float() * scale[:, None]).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x = x.reshape(-1, self.in_features).to(self.scale.dtype)
        y = self._matmul(x)
        if self.correction is not None:
            y = y + x.sum(-1, keepdim=True) * self.correction
        if self.bias is not None:
            y = y + self.bias
        return y.to(dtype).reshape(*shape[:-1], self.out_features)


class W8A8Linear(RuntimeLinear):
    def __init__(self, weight: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__(weight.shape[1], weight.shape[0], bias)
        # (in, out) contiguous: the layout _int_mm reads fastest as its second operand
        self.register_buffer("weight_t", weight.t().contiguous())
        self.register_buffer("scale", scale)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   bits: int, bias: torch.Tensor | None = None,
                   name: str = "linear") -> W8A8Linear:
        _refuse(W8A8, name, bits, scale, symmetric=not bool((zero != 128).any()))
        weight = (codes.to(torch.int16) - 128).to(torch.int8)
        return cls(weight, scale[:, 0].float(), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x = x.reshape(-1, self.in_features).float()
        sx = token_scales(x)
        x8 = torch.round(x / sx).to(torch.int8)
        y = torch._int_mm(x8, self.weight_t).float() * sx * self.scale
        if self.bias is not None:
            y = y + self.bias
        return y.to(dtype).reshape(*shape[:-1], self.out_features)
