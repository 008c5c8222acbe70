"""4-bit (and narrower) weight-only linears on torch's CPU int4 kernel.

`aten._weight_int4pack_mm_for_cpu` (the CPU port of tinygemm) multiplies float activations by
weights packed two codes per byte, with a (scale, zero) pair per group of 32/64/128/256 input
columns and per output row, dequantizing as w = (q - 8) * scale + zero. secateur's grid is
w = (q - z) * scale, so zero = (8 - z) * scale; any grid of at most 4 bits fits. A group size
the kernel lacks (per channel, 96, ...) is run as the largest kernel group dividing it, its
scale and zero repeated: exact, at a few more bytes of scales. Act-order weights whose column
groups are scattered (GPTQ `desc_act`, g_idx) are stored with their columns sorted by group
and the activations gathered in that order on each call (as exllama does).
"""

from __future__ import annotations

import math

import torch

from secateur.errors import SecateurError
from secateur.runtime import avx2
from secateur.runtime.base import RuntimeLinear

KERNEL_GROUPS = (256, 128, 64, 32)
ROW_MULTIPLE = 16  # the packing kernel takes out_features in multiples of 16; pad, then slice


def kernel_group(size: int) -> int | None:
    return next((g for g in KERNEL_GROUPS if size % g == 0), None)


def act_order_permutation(g_idx: torch.Tensor | None, size: int) -> torch.Tensor | None:
    """Column order that makes every group contiguous; None when it already is."""
    if g_idx is None:
        return None
    g_idx = g_idx.long()
    columns = torch.arange(g_idx.numel())
    if torch.equal(g_idx, columns // size):
        return None
    perm = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[perm], columns // size):
        raise SecateurError(f"act-order groups are not all {size} columns wide: this g_idx "
                            "cannot be laid out as contiguous groups")
    return perm


class Int4Linear(RuntimeLinear):
    """`backend` "avx2": secateur's AVX2 kernels (`secateur.runtime.avx2`, codes in their own
    layout, `scale_zeros` holding [scale, zero * scale] per kernel group); "aten": torch's
    int4pack kernel (its layout, [scale, (8 - zero) * scale]). `splits`: the output rows of the
    linears fused into this one (`secateur.runtime.fuse`), each returned as its own tensor."""

    def __init__(self, packed: torch.Tensor, scale_zeros: torch.Tensor, group: int,
                 in_features: int, out_features: int, perm: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, backend: str = "aten") -> None:
        super().__init__(in_features, out_features, bias)
        self.group = group
        self.backend = backend
        self.splits: list[int] = []
        self.register_buffer("packed", packed)
        self.register_buffer("scale_zeros", scale_zeros)
        self.register_buffer("perm", perm)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   group_size: int, g_idx: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, name: str = "linear") -> Int4Linear:
        """`codes` (out, in) in [0, 15]; `scale`, `zero` (out, groups) as in `QuantState`."""
        out_features, in_features = codes.shape
        if int(codes.max()) > 15:
            raise SecateurError(f"'{name}' has codes above 15: the int4 runtime takes weights "
                                "of at most 4 bits; use runtime='int8'")
        size = in_features if group_size == -1 else group_size
        # a partial last group (576 columns in groups of 128) runs as groups of gcd = 64
        group = kernel_group(math.gcd(size, in_features))
        if group is None:
            raise SecateurError(f"'{name}': the int4 kernel needs groups of a multiple of 32 "
                                f"columns, got {size} of {in_features}; use runtime='int8' "
                                "for per-channel weights")
        perm = act_order_permutation(g_idx, size)
        if perm is not None:
            codes = codes[:, perm]
        index = torch.arange(in_features // group) * group // size
        scale = scale.float()[:, index]
        zero = zero.float()[:, index]
        if avx2.kernels() is not None:
            scale_zeros = torch.stack([scale, zero * scale]).contiguous()
            return cls(avx2.pack_int4(codes), scale_zeros, group, in_features, out_features,
                       perm, bias, backend="avx2")
        zero = (8 - zero) * scale
        pad = -out_features % ROW_MULTIPLE
        if pad:
            codes = torch.cat([codes, codes.new_full((pad, in_features), 8)])
            scale = torch.cat([scale, scale.new_zeros(pad, scale.shape[1])])
            zero = torch.cat([zero, zero.new_zeros(pad, zero.shape[1])])
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        scale_zeros = torch.stack([scale.t(), zero.t()], -1).contiguous()
        return cls(packed, scale_zeros, group, in_features, out_features, perm, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        if self.backend == "avx2":
            out = avx2.kernels().int4_linear(x, self.packed, self.scale_zeros, self.bias,
                                             self.group, self.splits)
            return out if self.splits else out[0]
        y = self._aten(x)
        return list(y.split(self.splits, -1)) if self.splits else y

    def _aten(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x = x.reshape(-1, self.in_features).to(self.scale_zeros.dtype).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group,
                                                       self.scale_zeros)
        if y.shape[1] != self.out_features:
            y = y[:, :self.out_features]
        if self.bias is not None:
            y = y + self.bias
        return y.to(dtype).reshape(*shape[:-1], self.out_features)

    def logical_parameters(self) -> list[torch.Tensor]:
        if self.splits:  # fused: its members (`runtime.fuse.FusedOutput`) count their rows
            return []
        return super().logical_parameters()

    def _grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and (integer) zero point per row and kernel group, from either layout."""
        sz = self.scale_zeros.float()
        if self.backend == "avx2":
            scale, zs = sz[0], sz[1]
            safe = torch.where(scale == 0, 1.0, scale)
            return scale, torch.round(zs / safe)
        scale = sz[..., 0].t()[:self.out_features]
        safe = torch.where(scale == 0, 1.0, scale)
        return scale, 8 - torch.round(sz[..., 1].t()[:self.out_features] / safe)

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """(q - z) * s as `QuantState.dequantize` computes it: the kernels' own dequantization
        (q * s - z * s) leaves a rounding residue where a weight is exactly zero."""
        scale, zero = self._grid()
        if self.backend == "avx2":  # columns in the stored (act-order) order
            sz = self.scale_zeros.float()
            w = avx2.kernels().int4_dequantize(self.packed, sz[0], sz[1], self.group)
        else:
            w = super().dense_weight()
            if self.perm is not None:
                w = w[:, self.perm]
        g = torch.arange(self.in_features) // self.group
        s, z = scale[:, g], zero[:, g]
        w = (torch.round(w / torch.where(s == 0, 1.0, s) + z) - z) * s
        if self.perm is not None:  # stored column j is the input's column perm[j]
            w = torch.empty_like(w).index_copy_(1, self.perm, w)
        return w
