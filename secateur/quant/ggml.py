"""llama.cpp's block quantization types (ggml), filled by secateur's rounding.

Every supported type reads back as `value = s * level(q) + b` per sub-block of a row, with
integer codes q in [0, maxq]; level(q) = q - zero for the linear types: Q8_0/Q4_0/Q5_0
(symmetric, one fp16 scale per 32 weights), Q4_1/Q5_1 (scale and minimum per 32), Q4_K/Q5_K
(256-weight super-blocks of 8 x 32 with 6-bit scales and minimums under two fp16 factors), Q6_K
(16 x 16 with int8 scales under one fp16 factor) and Q3_K (16 x 16 with 6-bit signed scales
under one fp16 factor, codes -4..3). The non-linear IQ4_NL (one fp16 scale per 32) and IQ4_XS
(256-weight super-blocks of 8 x 32 with 6-bit signed scales) take level(q) from llama.cpp's
table `kvalues_iq4nl`. `s` and `b` are computed with the same float32 operations as ggml's
dequantization (and the `gguf` package's), so the weights held in memory equal the file's
blocks bit for bit.

How a block's grid is chosen follows llama.cpp's importance-weighted quantizers
(`make_qx_quants`, `make_qkx3_quants`, `quantize_row_iq4_nl_impl` in ggml-quants.c): a search
over candidate scales minimising sum(w * (x - x_hat)^2), where w = imatrix[j] * sqrt(sigma2 +
x_j^2) and the imatrix is the mean of x_j^2 over calibration tokens (the Hessian diagonal). The
scales and minimums of K-types are then rounded to their 6 bits. Which codes fill that fixed
grid is the rounding: nearest (RTN, what llama.cpp does) or GPTQ's error-compensating solve,
which chooses each super-block's grid when the solve reaches it, on the weights as already
updated. With an imatrix, the nearest rounding is llama.cpp's own for every type, step for
step (sigma2 per row or super-block as each quantizer takes it, Q6_K's imatrix alone, the
search's later candidates measured from its best minimum so far, make_qp_quants' code
refinement, codes from the unrounded scale where llama.cpp keeps them, sums in its order), so
its bytes are llama-quantize --imatrix's but for near-ties of the searches (>= 99% of blocks
identical on random weights, tests/runtime/test_llama_cpp.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from secateur.errors import SecateurError
from secateur.quant.ggml_names import ATTR, CODES, FIELD, IMATRIX, PREFIX, B, S
from secateur.quant.gptq import BLOCKSIZE, PERCDAMP, inverse_hessian_factor, one_thread


@dataclass(frozen=True)
class BlockType:
    name: str  # ggml's name, e.g. "Q4_K"
    block: int  # weights per block in the file
    sub: int  # weights sharing one scale (and minimum)
    maxq: int  # codes run 0..maxq
    zero: int  # value = s * (q - zero) + b
    has_min: bool  # b is a stored minimum (else 0)
    nbytes: int  # bytes per block
    # non-linear types: value = s * levels[q] + b (zero is then the code of a zero scale)
    levels: tuple[int, ...] | None = None


# llama.cpp's kvalues_iq4nl (ggml-common.h)
KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


TYPES: dict[str, BlockType] = {t.name: t for t in (
    BlockType("Q8_0", 32, 32, 255, 128, False, 34),
    BlockType("Q4_0", 32, 32, 15, 8, False, 18),
    BlockType("Q4_1", 32, 32, 15, 0, True, 20),
    BlockType("Q5_0", 32, 32, 31, 16, False, 22),
    BlockType("Q5_1", 32, 32, 31, 0, True, 24),
    BlockType("Q4_K", 256, 32, 15, 0, True, 144),
    BlockType("Q5_K", 256, 32, 31, 0, True, 176),
    BlockType("Q6_K", 256, 16, 63, 32, False, 210),
    BlockType("Q3_K", 256, 16, 7, 4, False, 110),
    BlockType("IQ4_NL", 32, 32, 15, 8, False, 18, KVALUES_IQ4NL),
    BlockType("IQ4_XS", 256, 32, 15, 8, False, 136, KVALUES_IQ4NL),
)}
# types whose llama.cpp quantizer takes sigma2 from each (super-)block, twice its mean square
_BLOCK_SIGMA = ("Q3_K", "Q4_K", "Q5_K", "IQ4_NL", "IQ4_XS")


def block_type(name: str) -> BlockType:
    try:
        return TYPES[name.upper()]
    except KeyError:
        raise SecateurError(f"ggml type '{name}' is not one secateur rounds into; it rounds "
                            f"{', '.join(TYPES)}") from None


@dataclass
class GGMLState:
    """A linear rounded into a ggml type: its codes and the fields its blocks store."""

    type: str
    codes: torch.Tensor  # (out, in) uint8, 0..maxq
    s: torch.Tensor  # (out, in // sub) float32
    b: torch.Tensor  # (out, in // sub) float32
    fields: dict[str, torch.Tensor] = field(default_factory=dict)  # per block, for packing
    # mean x_j^2 over the calibration tokens (llama.cpp's imatrix), where data was used
    imatrix: torch.Tensor | None = None
    imatrix_tokens: int = 0

    def dequantize(self) -> torch.Tensor:
        t = TYPES[self.type]
        rep = lambda v: v.repeat_interleave(t.sub, dim=1)  # noqa: E731
        return _value(t, self.codes, rep(self.s), rep(self.b))


def _value(t: BlockType, q: torch.Tensor, s: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if t.levels is not None:
        return s * torch.tensor(t.levels, dtype=torch.float32)[q.long()] + b
    return s * (q.float() - t.zero) + b


# -- choosing a block's grid (llama.cpp's searches, vectorised over blocks) -----------------

def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


def _affine_scale(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float = -0.9,
                  rdelta: float = 0.05, nstep: int = 36
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """make_qkx3_quants as llama.cpp runs it: value = scale * q + minimum, q in [0, nmax],
    minimum <= 0; returns the scale, the minimum and the search's own codes."""
    mn = x.min(1).values.clamp(max=0)
    mx = x.max(1).values
    span = mx - mn
    alive = span > 0
    span = torch.where(alive, span, torch.ones_like(span))
    sum_w = _rowsum(w)
    sum_x = _rowsum(w * x)

    def err(scale: torch.Tensor, minimum: torch.Tensor, lv: torch.Tensor) -> torch.Tensor:
        return _rowsum(w * (scale[:, None] * lv + minimum[:, None] - x) ** 2)

    iscale = nmax / span
    lv = torch.round(iscale[:, None] * (x - mn[:, None])).clamp_(0, nmax)
    best_scale, best_min, codes = 1 / iscale, mn.clone(), lv
    best = err(best_scale, best_min, lv)
    for step in range(nstep + 1):
        # llama.cpp measures every later candidate from the best minimum found so far, not
        # from the block's own minimum (its `min` is overwritten on improvement): so here
        cur = torch.where(alive, mx - best_min, torch.ones_like(span))
        iscale = (rmin + rdelta * step + nmax) / cur
        lv = torch.round(iscale[:, None] * (x - best_min[:, None])).clamp_(0, nmax)
        sum_l = _rowsum(w * lv)
        sum_l2 = _rowsum(w * lv * lv)
        sum_xl = _rowsum(w * lv * x)
        d = sum_w * sum_l2 - sum_l * sum_l
        ok = d > 0
        dd = torch.where(ok, d, torch.ones_like(d))
        scale = (sum_w * sum_xl - sum_x * sum_l) / dd
        minimum = (sum_l2 * sum_x - sum_l * sum_xl) / dd
        positive = minimum > 0
        minimum = torch.where(positive, torch.zeros_like(minimum), minimum)
        scale = torch.where(positive, sum_xl / sum_l2.clamp(min=1e-30), scale)
        e = err(scale, minimum, lv)
        better = ok & (e < best)
        best_scale = torch.where(better, scale, best_scale)
        best_min = torch.where(better, minimum, best_min)
        codes = torch.where(better[:, None], lv, codes)
        best = torch.where(better, e, best)
    return (torch.where(alive, best_scale, torch.zeros_like(span)),
            torch.where(alive, best_min, mn), torch.where(alive[:, None], codes, 0 * codes))


def _positive_scale(x: torch.Tensor, w: torch.Tensor, nmax: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qp_quants: non-negative x (a super-block's sub-block scales) as d * L, L in
    [0, nmax], d the weighted least-squares fit for the best of nine candidate grids."""
    mx = x.max(1).values
    alive = mx >= 1e-15
    mx = torch.where(alive, mx, torch.ones_like(mx))
    best_mse = best_iscale = None
    for step in [0, *range(-4, 0), *range(1, 5)]:
        iscale = (nmax + 0.1 * step) / mx
        lv = torch.round(iscale[:, None] * x).clamp_(max=nmax)
        mse = (w * (x - lv / iscale[:, None]) ** 2).sum(1)
        if best_mse is None:
            best_mse, best_iscale = mse, iscale
        else:
            better = mse < best_mse
            best_mse = torch.where(better, mse, best_mse)
            best_iscale = torch.where(better, iscale, best_iscale)
    lv = torch.round(best_iscale[:, None] * x).clamp_(0, nmax)
    sumlx = _rowsum(w * x * lv)
    suml2 = _rowsum(w * lv * lv)
    # then up to five passes moving one code at a time where that raises the fit's
    # sumlx^2 / suml2, in llama.cpp's order (it changes ~90% of Q4_K/Q5_K super-blocks' codes)
    for _ in range(5):
        changed = torch.zeros_like(alive)
        for i in range(x.shape[1]):
            wi, xi, li = w[:, i], x[:, i], lv[:, i]
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            ok = (slx > 0) & (sl2 > 0)
            new = torch.round(xi * sl2 / torch.where(ok, slx, 1)).clamp_(max=nmax)
            slx = slx + wi * xi * new
            sl2 = sl2 + wi * new * new
            take = ok & (new != li) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            lv[:, i] = torch.where(take, new, li)
            sumlx = torch.where(take, slx, sumlx)
            suml2 = torch.where(take, sl2, suml2)
            changed |= take
        if not changed.any():
            break
    d = torch.where(suml2 > 0, sumlx / suml2.clamp(min=1e-30), torch.zeros_like(sumlx))
    return torch.where(alive, d, torch.zeros_like(d)), torch.where(alive[:, None], lv, 0 * lv)


def _rowsum(v: torch.Tensor) -> torch.Tensor:
    """Sums along rows in llama.cpp's order, one float32 add at a time: torch's own (pairwise)
    sums differ in the last bits, and that flips llama.cpp's searches where two candidate
    scales nearly tie (on random weights ~0.3% of blocks, ~0.05% in order)."""
    acc = v[:, 0].clone()
    for j in range(1, v.shape[1]):
        acc += v[:, j]
    return acc


def _qx_quants(x: torch.Tensor, w: torch.Tensor, nmax: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qx_quants(rmse_type=1, weights) as llama.cpp runs it, in its float32 operations:
    the scale and the codes l + nmax (l in [-nmax, nmax-1]) of the best of 19 candidate
    grids, by llama.cpp's own comparison (ties keep the earlier candidate)."""
    idx = x.abs().argmax(1, keepdim=True)
    mx = x.gather(1, idx).squeeze(1)
    alive = mx.abs() >= 1e-15
    mx = torch.where(alive, mx, torch.ones_like(mx))

    def trial(num: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        iscale = torch.full_like(mx, -num) / mx
        lv = torch.round(iscale[:, None] * x).clamp_(-nmax, nmax - 1)
        return lv, _rowsum(w * x * lv), _rowsum(w * lv * lv)

    lv, sumlx, suml2 = trial(float(nmax))
    zero = torch.zeros_like(mx)
    scale = torch.where(suml2 != 0, sumlx / torch.where(suml2 != 0, suml2, 1), zero)
    best = scale * sumlx
    codes = lv
    for step in [*range(-9, 0), *range(1, 10)]:
        num = float(np.float32(nmax) + np.float32(0.1) * np.float32(step))  # nmax + 0.1f*is
        lv, sumlx, suml2 = trial(num)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        new = sumlx / torch.where(suml2 > 0, suml2, 1)
        scale = torch.where(better, new, scale)
        best = torch.where(better, new * sumlx, best)
        codes = torch.where(better[:, None], lv, codes)
    return (torch.where(alive, scale, zero),
            torch.where(alive[:, None], codes + nmax, torch.zeros_like(codes)))


def _best_index(v: torch.Tensor, levels: tuple[int, ...]) -> torch.Tensor:
    """best_index_int8: the nearest table entry (a tie goes up), as llama.cpp finds it."""
    vals = torch.tensor(levels, dtype=torch.float32)
    n = len(levels)
    mu = torch.searchsorted(vals, v.contiguous(), right=True).clamp_(1, n - 1)
    idx = torch.where(v - vals[mu - 1] < vals[mu] - v, mu - 1, mu)
    idx = torch.where(v <= vals[0], torch.zeros_like(idx), idx)
    return torch.where(v >= vals[-1], torch.full_like(idx, n - 1), idx)


def _iq4_scale(x: torch.Tensor, w: torch.Tensor, levels: tuple[int, ...], ntry: int = 7
               ) -> torch.Tensor:
    """quantize_row_iq4_nl_impl's scale search of each row's block (float32, unrounded)."""
    vals = torch.tensor(levels, dtype=torch.float32)
    idx = x.abs().argmax(1, keepdim=True)
    mx = x.gather(1, idx).squeeze(1)
    alive = mx.abs() >= 1e-15
    mx = torch.where(alive, mx, torch.ones_like(mx))

    def sums(inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = vals[_best_index(inv[:, None] * x, levels)]
        return _rowsum(w * q * x), _rowsum(w * q * q)

    d = -mx / torch.full_like(mx, float(levels[0]))
    sumqx, sumq2 = sums(torch.ones_like(d) / d)
    zero = torch.zeros_like(mx)
    d = torch.where(sumq2 > 0, sumqx / torch.where(sumq2 > 0, sumq2, 1), zero)
    best = d * sumqx
    for itry in range(-ntry, ntry + 1):
        sumqx, sumq2 = sums(torch.full_like(mx, float(itry + levels[0])) / mx)
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        new = sumqx / torch.where(sumq2 > 0, sumq2, 1)
        d = torch.where(better, new, d)
        best = torch.where(better, new * sumqx, best)
    return torch.where(alive, d, zero)


def _inverse(v: torch.Tensor) -> torch.Tensor:
    """1/v where v != 0, else 0 (llama.cpp's `d ? 1/d : 0`)."""
    nz = v != 0
    return torch.where(nz, torch.ones_like(v) / torch.where(nz, v, 1), torch.zeros_like(v))


def importance_weights(x: torch.Tensor, imatrix: torch.Tensor | None, sigma2: torch.Tensor
                       ) -> torch.Tensor:
    """llama.cpp's per-weight weights: imatrix * sqrt(sigma2 + x^2) (imatrix 1 without data)."""
    base = torch.sqrt(sigma2[:, None] + x * x)
    return base if imatrix is None else imatrix[None, :] * base


def _weights(t: BlockType, x: torch.Tensor, imp: torch.Tensor | None, sigma2: torch.Tensor
             ) -> torch.Tensor:
    """A block's weights as llama.cpp's quantizer of type t computes them."""
    if t.name == "Q6_K" and imp is not None:
        return imp[None, :].expand_as(x)  # quantize_row_q6_K_impl: the imatrix alone
    if t.name in _BLOCK_SIGMA:
        if imp is None and t.levels is not None:
            return x * x  # quantize_iq4_nl / _xs without an imatrix
        sigma2 = 2 * _rowsum(x * x) / t.block
    return importance_weights(x, imp, sigma2)


def choose_grid(t: BlockType, x: torch.Tensor, w: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Grid of one block of every row: x, w (rows, t.block) -> s, b (rows, block // sub) and
    the stored fields."""
    rows = x.shape[0]
    nsub = t.block // t.sub
    xs = x.reshape(rows * nsub, t.sub)
    ws = w.reshape(rows * nsub, t.sub)
    if t.name == "Q8_0":
        d = _fp16(x.abs().amax(1) / 127)
        return d[:, None], torch.zeros_like(d)[:, None], {"d": d}
    if t.name in ("Q4_0", "Q5_0"):
        # quantize_row_q4_0/5_0_impl store the search's own codes (from the unrounded scale)
        scale, codes = _qx_quants(x, w, (t.maxq + 1) // 2)
        d = _fp16(scale)
        return d[:, None], torch.zeros_like(d)[:, None], {"d": d, "codes": codes.to(torch.uint8)}
    if t.name in ("Q4_1", "Q5_1"):
        # quantize_row_q4_1/5_1_impl store the search's own codes
        scale, minimum, codes = _affine_scale(x, w, t.maxq)
        d, m = _fp16(scale), _fp16(minimum)
        return d[:, None], m[:, None], {"d": d, "m": m, "codes": codes.to(torch.uint8)}
    if t.name in ("Q4_K", "Q5_K"):
        scale, minimum, _ = _affine_scale(xs, ws, t.maxq)
        scale = scale.reshape(rows, nsub).clamp(min=0)
        mins = (-minimum).reshape(rows, nsub)
        sw = _rowsum(ws).reshape(rows, nsub)
        d, sc = _positive_scale(scale, sw, 63)
        dmin, mq = _positive_scale(mins, sw, 63)
        d, dmin = _fp16(d), _fp16(dmin)
        s = d[:, None] * sc
        b = -(dmin[:, None] * mq)
        return s, b, {"d": d, "dmin": dmin, "sc": sc.to(torch.uint8), "m": mq.to(torch.uint8)}
    if t.name == "Q6_K":  # quantize_row_q6_K_impl
        scale, search = _qx_quants(xs, ws, 32)
        scale = scale.reshape(rows, nsub)
        idx = scale.abs().argmax(1, keepdim=True)
        top = scale.gather(1, idx).squeeze(1)
        alive = top.abs() >= 1e-15
        iscale = torch.where(alive, -128 / torch.where(alive, top, torch.ones_like(top)),
                             torch.zeros_like(top))
        sc = torch.round(iscale[:, None] * scale).clamp_(-128, 127)
        d = _fp16(torch.where(alive, 1 / torch.where(alive, iscale, torch.ones_like(top)),
                              torch.zeros_like(top)))
        s = d[:, None] * sc
        # a sub-block whose scale is zero keeps its search's codes, a dead block is all zero
        rep = s.repeat_interleave(t.sub, 1)
        codes = torch.where(rep != 0, _codes(x, rep, torch.zeros_like(rep), t),
                            search.reshape(rows, t.block).float())
        codes = torch.where(alive[:, None], codes, torch.zeros_like(codes))
        return s, torch.zeros_like(s), {"d": d, "sc": sc.to(torch.int8),
                                        "codes": codes.to(torch.uint8)}
    if t.name == "Q3_K":  # quantize_row_q3_K_impl
        scale, first = _qx_quants(xs, ws, 4)
        scale = scale.reshape(rows, nsub)
        sw = _rowsum(ws).reshape(rows, nsub)
        d_block, sc = _qx_quants(scale, sw, 32)  # sc = 6-bit scale + 32
        d = _fp16(d_block)
        s = d[:, None] * (sc - 32)
        xb = x.reshape(rows, nsub, t.sub)
        q = torch.round(xb / torch.where(s != 0, s, 1)[..., None]).clamp_(-4, 3) + 4
        # a zero sub-block scale keeps the codes of its own search, as llama.cpp does
        q = torch.where(s[..., None] != 0, q, first.reshape(rows, nsub, t.sub))
        return s, torch.zeros_like(s), {"d": d, "sc": sc.to(torch.uint8),
                                        "codes": q.reshape(rows, t.block).to(torch.uint8)}
    if t.name == "IQ4_NL":  # quantize_row_iq4_nl_impl, one block
        d32 = _iq4_scale(x, w, t.levels)
        d = _fp16(d32)
        q = _best_index(_inverse(d32)[:, None] * x, t.levels)
        return d[:, None], torch.zeros_like(d)[:, None], {"d": d, "codes": q.to(torch.uint8)}
    if t.name == "IQ4_XS":  # the same, eight sub-blocks under 6-bit scales
        scale = _iq4_scale(xs, ws, t.levels).reshape(rows, nsub)
        top = scale.gather(1, scale.abs().argmax(1, keepdim=True)).squeeze(1)
        d32 = -top / torch.full_like(top, 32.0)
        lv = torch.round(_inverse(d32)[:, None] * scale).clamp_(-32, 31)
        idl = _inverse(d32[:, None] * lv)
        q = _best_index(idl.repeat_interleave(t.sub, 1) * x, t.levels)
        d = _fp16(d32)
        s = d[:, None] * lv
        return s, torch.zeros_like(s), {"d": d, "sc": (lv + 32).to(torch.uint8),
                                        "codes": q.to(torch.uint8)}
    raise SecateurError(f"no grid search for ggml type {t.name}")


def _codes(col: torch.Tensor, s: torch.Tensor, b: torch.Tensor, t: BlockType) -> torch.Tensor:
    """The nearest codes on a fixed grid (a zero scale: code `zero`)."""
    safe = torch.where(s != 0, s, torch.ones_like(s))
    v = (col - b) / safe
    if t.levels is not None:
        q = _best_index(v, t.levels).float()
    elif t.name == "Q3_K":  # llama.cpp rounds before the offset
        q = torch.round(v).clamp_(-4, 3) + 4
    else:
        q = torch.round(v + t.zero).clamp_(0, t.maxq)
    return torch.where(s != 0, q, torch.full_like(q, t.zero))


def _check_width(t: BlockType, cols: int, name: str) -> None:
    if cols % t.block:
        raise SecateurError(f"{name}: rows of {cols} weights do not split into {t.name} blocks "
                            f"of {t.block}; llama.cpp falls back to another type for it")


# -- rounding -------------------------------------------------------------------------------

@torch.no_grad()
def rtn_ggml(weight: torch.Tensor, type_name: str, imatrix: torch.Tensor | None = None,
             name: str = "weight") -> tuple[torch.Tensor, GGMLState]:
    """Nearest codes on llama.cpp's importance-weighted grid (what llama-quantize does)."""
    t = block_type(type_name)
    w = weight.detach().float()
    rows, cols = w.shape
    _check_width(t, cols, name)
    sigma2 = _sigma2(w, t)
    s_all, b_all, fields, own = [], [], [], []
    for c in range(0, cols, t.block):
        x = w[:, c:c + t.block]
        imp = None if imatrix is None else imatrix[c:c + t.block].float()
        s, b, f = choose_grid(t, x, _weights(t, x, imp, sigma2))
        s_all.append(s)
        b_all.append(b)
        own.append(f.pop("codes", None))  # llama.cpp's own codes where the search gives them
        fields.append(f)
    s = torch.cat(s_all, 1)
    b = torch.cat(b_all, 1)
    codes = (torch.cat(own, 1) if own[0] is not None else
             _codes(w, s.repeat_interleave(t.sub, 1), b.repeat_interleave(t.sub, 1), t))
    state = GGMLState(t.name, codes.to(torch.uint8), s, b, _stack_fields(fields))
    return state.dequantize(), state


def _sigma2(w: torch.Tensor, t: BlockType) -> torch.Tensor:
    # llama.cpp's 32-weight types take the row's mean square; the super-block types recompute
    # theirs per block (_BLOCK_SIGMA) or, Q6_K with an imatrix, take none: the 256 case only
    # serves Q6_K without an imatrix, where twice the row's mean square stands in
    ms = (w * w).mean(1)
    return 2 * ms if t.block == 256 else ms


def _stack_fields(fields: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([f[k] for f in fields], 1) for k in fields[0]}


@torch.no_grad()
def gptq_ggml(weight: torch.Tensor, hessian: torch.Tensor, type_name: str,
              percdamp: float = PERCDAMP, blocksize: int = BLOCKSIZE, name: str = "weight",
              act_order: bool = False) -> tuple[torch.Tensor, GGMLState]:
    """GPTQ onto llama.cpp's block grids, with the Hessian diagonal as imatrix.

    In order (default), each block's grid is chosen when the solve reaches it, on the weights
    as updated so far. With `act_order`, every grid is fixed first on the original weights
    (the blocks stay contiguous, as the format needs) and columns are solved by decreasing
    Hessian diagonal (GPTQ's act-order with static groups)."""
    t = block_type(type_name)
    w = weight.detach().clone().float()
    rows, cols = w.shape
    _check_width(t, cols, name)
    if blocksize % t.block and t.block % blocksize:
        raise SecateurError(f"GPTQ's lazy block ({blocksize}) and {t.name}'s block ({t.block}) "
                            "must divide one another")
    with one_thread():
        h = hessian.detach().clone().float()
        dead = torch.diag(h) == 0
        h[dead, dead] = 1
        w[:, dead] = 0
        imatrix = torch.diag(h).clone()
        sigma2 = _sigma2(w, t)
        grids: list[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]] = []

        def choose(x: torch.Tensor, col: int) -> None:
            s, b, f = choose_grid(t, x, _weights(t, x, imatrix[col:col + t.block], sigma2))
            f.pop("codes", None)  # GPTQ solves its own
            grids.append((s, b, f))

        perm = None
        if act_order:
            for c in range(0, cols, t.block):
                choose(w[:, c:c + t.block], c)
            perm = torch.argsort(imatrix, descending=True, stable=True)
            w, h = w[:, perm], h[perm][:, perm]
        hinv = inverse_hessian_factor(h, percdamp, "GPTQ")
        del h
        codes = _solve_on_grids(w, hinv, t, blocksize, perm, grids, choose)
        if perm is not None:
            codes = codes[:, torch.argsort(perm)]
    state = GGMLState(t.name, codes, torch.cat([g[0] for g in grids], 1),
                      torch.cat([g[1] for g in grids], 1), _stack_fields([g[2] for g in grids]))
    return state.dequantize(), state


def _solve_on_grids(w: torch.Tensor, hinv: torch.Tensor, t: BlockType, blocksize: int,
                    perm: torch.Tensor | None, grids: list, choose: Any) -> torch.Tensor:
    """GPTQ's column loop with lazy block updates. `perm` set: every grid is in `grids` and
    column j of `w` is original column perm[j]; else `choose(x, col)` appends each block's
    grid when the solve reaches its first column."""
    rows, cols = w.shape
    codes = torch.zeros(rows, cols, dtype=torch.uint8)
    if perm is not None:
        s_col = torch.cat([g[0] for g in grids], 1).repeat_interleave(t.sub, 1)[:, perm]
        b_col = torch.cat([g[1] for g in grids], 1).repeat_interleave(t.sub, 1)[:, perm]
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if perm is None and col % t.block == 0:
                # the block's weights as updated so far: inside this lazy block from w1, a
                # super-block longer than it starts with it (i == 0), so from w
                choose(w1[:, i:i + t.block] if i + t.block <= i2 - i1
                       else w[:, col:col + t.block], col)
                s_blk = grids[-1][0].repeat_interleave(t.sub, 1)
                b_blk = grids[-1][1].repeat_interleave(t.sub, 1)
            if perm is None:
                sj, bj = s_blk[:, col % t.block], b_blk[:, col % t.block]
            else:
                sj, bj = s_col[:, col], b_col[:, col]
            q = _codes(w1[:, i], sj, bj, t)
            codes[:, col] = q.to(torch.uint8)
            torch.div(w1[:, i] - _value(t, q, sj, bj), hinv1[i, i], out=err1[:, i])
            w1[:, i:].addr_(err1[:, i], hinv1[i, i:], alpha=-1)
        w[:, i2:] -= err1.matmul(hinv[i1:i2, i2:])
    return codes


# -- packing into ggml's block bytes ------------------------------------------------------

def _f16_bytes(v: torch.Tensor) -> np.ndarray:
    return v.to(torch.float16).numpy().view(np.uint8).reshape(*v.shape, 2)


def _nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return ((lo & 0xF) | ((hi & 0xF) << 4)).astype(np.uint8)


def pack(state: GGMLState) -> np.ndarray:
    """The tensor's bytes as ggml lays them out: (rows, row_bytes) uint8."""
    t = TYPES[state.type]
    rows, cols = state.codes.shape
    nb = cols // t.block
    q = state.codes.numpy().astype(np.uint8).reshape(rows, nb, t.block)
    f = state.fields
    if t.name == "Q8_0":
        parts = [_f16_bytes(f["d"]), (q.astype(np.int16) - 128).astype(np.int8).view(np.uint8)]
    elif t.name in ("Q4_0", "Q4_1"):
        parts = [_f16_bytes(f["d"])]
        if t.has_min:
            parts.append(_f16_bytes(f["m"]))
        parts.append(_nibbles(q[..., :16], q[..., 16:]))
    elif t.name in ("Q5_0", "Q5_1"):
        parts = [_f16_bytes(f["d"])]
        if t.has_min:
            parts.append(_f16_bytes(f["m"]))
        bits = ((q >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
        qh = bits.sum(-1, dtype=np.uint32).astype("<u4")
        parts += [qh.view(np.uint8).reshape(rows, nb, 4), _nibbles(q[..., :16], q[..., 16:])]
    elif t.name in ("Q4_K", "Q5_K"):
        sc = f["sc"].numpy().astype(np.uint8)
        mn = f["m"].numpy().astype(np.uint8)
        scales = np.concatenate([
            sc[..., :4] | ((sc[..., 4:] >> 4) << 6),
            mn[..., :4] | ((mn[..., 4:] >> 4) << 6),
            (sc[..., 4:] & 0xF) | ((mn[..., 4:] & 0xF) << 4)], -1).astype(np.uint8)
        chunks = q.reshape(rows, nb, 4, 2, 32)  # 64-weight chunks: low nibbles, high nibbles
        qs = _nibbles(chunks[:, :, :, 0], chunks[:, :, :, 1]).reshape(rows, nb, 128)
        parts = [_f16_bytes(f["d"]), _f16_bytes(f["dmin"]), scales]
        if t.name == "Q5_K":
            hb = ((q >> 4) & 1).reshape(rows, nb, 8, 32).astype(np.uint8)
            qh = (hb << np.arange(8, dtype=np.uint8)[:, None]).sum(2, dtype=np.uint8)
            parts.append(qh)
        parts.append(qs)
    elif t.name == "Q6_K":
        half = q.reshape(rows, nb, 2, 2, 64)  # 128-weight halves, 64-weight quarters
        ql = _nibbles(half[:, :, :, 0], half[:, :, :, 1]).reshape(rows, nb, 128)
        hb = ((q >> 4) & 3).reshape(rows, nb, 2, 4, 32).astype(np.uint8)
        qh = (hb << (2 * np.arange(4, dtype=np.uint8))[:, None]).sum(3, dtype=np.uint8)
        parts = [ql, qh.reshape(rows, nb, 64), f["sc"].numpy().view(np.uint8),
                 _f16_bytes(f["d"])]
    elif t.name == "Q3_K":
        hb = (q >> 2).reshape(rows, nb, 8, 32).astype(np.uint8)  # bit j // 32 of hmask[j % 32]
        hmask = (hb << np.arange(8, dtype=np.uint8)[:, None]).sum(2, dtype=np.uint8)
        lo = (q & 3).reshape(rows, nb, 2, 4, 32).astype(np.uint8)  # 128-weight halves
        qs = (lo << (2 * np.arange(4, dtype=np.uint8))[:, None]).sum(3, dtype=np.uint8)
        sc = f["sc"].numpy().astype(np.uint8)  # (rows, nb, 16), 0..63
        low = sc & 0xF
        high = (sc >> 4).reshape(rows, nb, 4, 4)  # [j // 4, j % 4]
        scales = np.concatenate([
            low[..., :8] | (low[..., 8:] << 4),
            (high << (2 * np.arange(4, dtype=np.uint8))[:, None]).sum(2, dtype=np.uint8)],
            -1).astype(np.uint8)
        parts = [hmask, qs.reshape(rows, nb, 64), scales, _f16_bytes(f["d"])]
    elif t.name == "IQ4_NL":
        parts = [_f16_bytes(f["d"]), _nibbles(q[..., :16], q[..., 16:])]
    elif t.name == "IQ4_XS":
        sc = f["sc"].numpy().astype(np.uint16)  # (rows, nb, 8), 0..63
        scales_h = ((sc >> 4) << (2 * np.arange(8, dtype=np.uint16))).sum(-1, dtype=np.uint16)
        scales_l = _nibbles(sc[..., 0::2].astype(np.uint8), sc[..., 1::2].astype(np.uint8))
        sub = q.reshape(rows, nb, 8, 32)
        qs = _nibbles(sub[..., :16], sub[..., 16:]).reshape(rows, nb, 128)
        parts = [_f16_bytes(f["d"]),
                 scales_h.astype("<u2").view(np.uint8).reshape(rows, nb, 2), scales_l, qs]
    else:
        raise SecateurError(f"no packer for ggml type {t.name}")
    blocks = np.concatenate(parts, axis=-1)
    assert blocks.shape[-1] == t.nbytes, (t.name, blocks.shape)
    return np.ascontiguousarray(blocks.reshape(rows, nb * t.nbytes))


# -- where a rounded linear keeps its codes ---------------------------------------------------
# As the compressed-tensors grids (`secateur.quant.state`), in the linear's state_dict: buffers
# beside its weight, so that a layer checkpoint, `deepcopy`, `.to(device)` and a distributed
# broadcast carry them with no code of their own, and the scheme (the ggml type) as a frozen
# attribute. Buffers rather than parameters: optimizers and parameter counts must not see them.
# Dense formats leave them out (`ggml_names.ggml_keys`): the weight is already dequantized.

@dataclass(frozen=True)
class GGMLScheme:
    """What a rounded linear's buffers are, as `QuantScheme` is for a grid: JSON-ready."""

    type: str
    imatrix_tokens: int = 0  # the calibration tokens its imatrix buffer averages over


def set_ggml_state(module: torch.nn.Module, state: GGMLState) -> None:
    """Register the state's tensors as buffers and its type as the scheme, replacing any."""
    clear_ggml_state(module)
    module.register_buffer(CODES, state.codes)
    module.register_buffer(S, state.s)
    module.register_buffer(B, state.b)
    for key, tensor in state.fields.items():
        module.register_buffer(FIELD + key, tensor)
    if state.imatrix is not None:
        module.register_buffer(IMATRIX, state.imatrix)
    module.__dict__[ATTR] = GGMLScheme(state.type, int(state.imatrix_tokens))


def set_ggml_scheme(module: torch.nn.Module, scheme: GGMLScheme,
                    tensors: dict[str, torch.Tensor]) -> None:
    """Register a scheme and its buffers by name (`tensors`: buffer name -> tensor), as a
    layer checkpoint holds them, so that `load_state_dict` finds every key."""
    clear_ggml_state(module)
    for name, tensor in tensors.items():
        if not name.startswith(PREFIX):
            raise SecateurError(f"'{name}' is not a ggml block tensor")
        module.register_buffer(name, tensor)
    module.__dict__[ATTR] = scheme
    ggml_state(module)  # refuses a set of tensors that is not a whole state


def clear_ggml_state(module: torch.nn.Module) -> None:
    module.__dict__.pop(ATTR, None)
    for name in [n for n in module._buffers if n.startswith(PREFIX)]:
        del module._buffers[name]


def ggml_scheme(module: torch.nn.Module) -> GGMLScheme | None:
    return module.__dict__.get(ATTR)


def ggml_state(module: torch.nn.Module) -> GGMLState | None:
    """The linear's blocks, read from its buffers (the tensors themselves, not copies)."""
    scheme = ggml_scheme(module)
    if scheme is None:
        return None
    buffers = module._buffers
    fields = {n[len(FIELD):]: t for n, t in buffers.items() if n.startswith(FIELD)}
    return GGMLState(scheme.type, buffers[CODES], buffers[S], buffers[B], fields,
                     buffers.get(IMATRIX), scheme.imatrix_tokens)


def ggml_states(model: torch.nn.Module) -> dict[str, GGMLState]:
    """transformers weight name -> codes, for every linear a gguf step rounded."""
    return {f"{name}.weight": s for name, m in model.named_modules()
            if (s := ggml_state(m)) is not None}

