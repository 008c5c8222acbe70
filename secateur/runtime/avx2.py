"""AVX2 kernels for int4 / int8 weight-only linears, compiled on first use.

Why: torch 2.13's CPU kernels for packed integer weights (`_weight_int4pack_mm_for_cpu`,
`_weight_int8pack_mm`, `_int_mm`) have fast paths for AVX-512 only; on an AVX2 machine they run
8-60x slower than a dense float32 matmul (bench/quantization.py --kernels), so a 4-bit model
would decode slower than the dense one. These kernels read 4-bit (or 8-bit) codes, widen them
to float in registers and accumulate with FMA against float32 activations: the weights cross
the memory bus at 0.5 (or 1) byte each, which is what batch-1 decode is bound by. Results equal
the dequantized matmul up to float summation order.

Layout (int4): per output row, each block of 16 columns is 8 bytes; byte j holds the code of
column j in its low nibble and of column j + 8 in its high nibble, so one widening instruction
and an and / a shift give two runs of 8 contiguous columns (the shuffle port, the bottleneck of
splitting bytes first, is used once per 16 codes). Dequantization per group g: w = q * s - zs with
zs = z * s; the zero-point term is applied once per group from the activations' group sums.

For more than a few rows of activations (prefill) the weight is dequantized to float32 and
multiplied by torch's own matmul, which is far better blocked than a per-row dot product.

Compiled with torch's cpp_extension (needs a C++ compiler) into torch's extensions cache; where
that fails, or the CPU lacks AVX2/FMA, or SECATEUR_NO_AVX2=1, `kernels()` is None and the
runtimes use torch's kernels.
"""

from __future__ import annotations

import logging
import os
import platform

import torch

log = logging.getLogger(__name__)

GEMV_ROWS = 8  # at most this many activation rows go through the dot-product kernels

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <vector>
#include <cmath>

static constexpr int64_t GEMV_ROWS = @GEMV_ROWS@;
static constexpr int64_t PREFETCH_BYTES = 1024;

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 32 codes from 16 bytes: each 8-byte half widens to eight int32 lanes in one shuffle-port
// instruction, and each lane's two nibbles (columns j and j + 8) split with an and / a shift.
static inline void unpack32(const uint8_t* p, __m256& w0, __m256& w1, __m256& w2, __m256& w3) {
  const __m256i mask = _mm256_set1_epi32(0x0F);
  const __m256i v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m256i v1 = _mm256_cvtepu8_epi32(
      _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8)));
  w0 = _mm256_cvtepi32_ps(_mm256_and_si256(v0, mask));
  w1 = _mm256_cvtepi32_ps(_mm256_srli_epi32(v0, 4));
  w2 = _mm256_cvtepi32_ps(_mm256_and_si256(v1, mask));
  w3 = _mm256_cvtepi32_ps(_mm256_srli_epi32(v1, 4));
}

static inline __m256 widen8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
      _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

static void check(const torch::Tensor& x, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(),
              "x must be a contiguous 2-D float32 tensor");
  TORCH_CHECK(x.size(1) == k, "x has the wrong number of columns");
}

torch::Tensor int4_dequantize(torch::Tensor q, torch::Tensor scales, torch::Tensor zs,
                              int64_t group) {
  const int64_t N = q.size(0), K = q.size(1) * 2, G = scales.size(1);
  auto w = torch::empty({N, K}, scales.options());
  const uint8_t* Q = q.data_ptr<uint8_t>();
  const float* S = scales.data_ptr<float>();
  const float* Z = zs.data_ptr<float>();
  float* W = w.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t g = 0; g < G; ++g) {
        const __m256 s = _mm256_set1_ps(S[n * G + g]), z = _mm256_set1_ps(Z[n * G + g]);
        for (int64_t k = g * group; k < (g + 1) * group; k += 32) {
          __m256 w0, w1, w2, w3;
          unpack32(Q + n * (K / 2) + k / 2, w0, w1, w2, w3);
          float* o = W + n * K + k;
          _mm256_storeu_ps(o, _mm256_fmsub_ps(w0, s, z));
          _mm256_storeu_ps(o + 8, _mm256_fmsub_ps(w1, s, z));
          _mm256_storeu_ps(o + 16, _mm256_fmsub_ps(w2, s, z));
          _mm256_storeu_ps(o + 24, _mm256_fmsub_ps(w3, s, z));
        }
      }
    }
  });
  return w;
}

// One activation row against rows n and n + 1 of the packed weight: eight independent FMA
// chains (four per row) so the loop runs at FMA throughput rather than FMA latency; each
// group's dot is scaled into a vector accumulator, reduced once per row.
static inline void int4_rows2(const float* x, const float* xs, const uint8_t* q0,
                              const uint8_t* q1, const float* s0, const float* s1,
                              const float* z0, const float* z1, int64_t G, int64_t group,
                              float* y0, float* y1) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  float zero0 = 0.f, zero1 = 0.f;
  for (int64_t g = 0; g < G; ++g) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
           a3 = _mm256_setzero_ps(), b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps(),
           b2 = _mm256_setzero_ps(), b3 = _mm256_setzero_ps();
    for (int64_t k = g * group; k < (g + 1) * group; k += 32) {
      const __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
      const __m256 x2 = _mm256_loadu_ps(x + k + 16), x3 = _mm256_loadu_ps(x + k + 24);
      __m256 w0, w1, w2, w3;
      // the rows are one sequential stream, but the hardware prefetcher alone leaves the
      // loop waiting on memory: fetching ~1 KiB ahead was ~10% faster cold (both rows' lines)
      _mm_prefetch(reinterpret_cast<const char*>(q0 + k / 2) + PREFETCH_BYTES, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(q1 + k / 2) + PREFETCH_BYTES, _MM_HINT_T0);
      unpack32(q0 + k / 2, w0, w1, w2, w3);
      a0 = _mm256_fmadd_ps(w0, x0, a0); a1 = _mm256_fmadd_ps(w1, x1, a1);
      a2 = _mm256_fmadd_ps(w2, x2, a2); a3 = _mm256_fmadd_ps(w3, x3, a3);
      unpack32(q1 + k / 2, w0, w1, w2, w3);
      b0 = _mm256_fmadd_ps(w0, x0, b0); b1 = _mm256_fmadd_ps(w1, x1, b1);
      b2 = _mm256_fmadd_ps(w2, x2, b2); b3 = _mm256_fmadd_ps(w3, x3, b3);
    }
    acc0 = _mm256_fmadd_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                           _mm256_set1_ps(s0[g]), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_add_ps(_mm256_add_ps(b0, b1), _mm256_add_ps(b2, b3)),
                           _mm256_set1_ps(s1[g]), acc1);
    zero0 += z0[g] * xs[g];
    zero1 += z1[g] * xs[g];
  }
  *y0 = hsum(acc0) - zero0;
  *y1 = hsum(acc1) - zero1;
}

torch::Tensor int4_mm(torch::Tensor x, torch::Tensor q, torch::Tensor scales, torch::Tensor zs,
                      int64_t group) {
  const int64_t M = x.size(0), N = q.size(0), K = q.size(1) * 2, G = scales.size(1);
  check(x, K);
  TORCH_CHECK(group % 32 == 0 && G * group == K, "groups must be multiples of 32 columns");
  auto y = torch::empty({M, N}, x.options());
  const float* X = x.data_ptr<float>();
  std::vector<float> xsum(M * G, 0.f);  // per row and group: the zero points' share
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xsum[m * G + k / group] += X[m * K + k];
  const float* XS = xsum.data();
  const uint8_t* Q = q.data_ptr<uint8_t>();
  const float* S = scales.data_ptr<float>();
  const float* Z = zs.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  const int64_t pairs = (N + 1) / 2;
  at::parallel_for(0, pairs, 8, [&](int64_t p0, int64_t p1) {
    float spare;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n = 2 * p, n1 = std::min(n + 1, N - 1);  // an odd last row pairs itself
      for (int64_t m = 0; m < M; ++m) {
        int4_rows2(X + m * K, XS + m * G, Q + n * (K / 2), Q + n1 * (K / 2), S + n * G,
                   S + n1 * G, Z + n * G, Z + n1 * G, G, group, Y + m * N + n,
                   n1 == n ? &spare : Y + m * N + n1);
      }
    }
  });
  return y;
}

// The whole linear in one call (Python's per-call work is most of a small layer's time at
// batch 1): any leading dims, float32 / bfloat16 activations, optional bias, the output split
// into contiguous pieces along its rows (fused q/k/v or gate/up weights give one piece each).
// `scale_zeros` (2, N, groups): [scale, zero * scale].
std::vector<torch::Tensor> int4_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scale_zeros,
                                       c10::optional<torch::Tensor> bias, int64_t group,
                                       std::vector<int64_t> splits) {
  const int64_t K = q.size(1) * 2, N = q.size(0);
  TORCH_CHECK(x.size(-1) == K, "x has the wrong number of columns");
  auto x2 = x.reshape({-1, K}).to(torch::kFloat).contiguous();
  auto sz = scale_zeros.to(torch::kFloat).contiguous();
  torch::Tensor y = x2.size(0) <= GEMV_ROWS
      ? int4_mm(x2, q, sz[0], sz[1], group)
      : at::mm(x2, int4_dequantize(q, sz[0], sz[1], group).t());
  if (bias.has_value()) y.add_(*bias);
  if (x.scalar_type() != torch::kFloat) y = y.to(x.scalar_type());
  auto shape = x.sizes().vec();
  std::vector<torch::Tensor> out;
  if (splits.empty()) splits.push_back(N);
  int64_t start = 0;
  for (int64_t n : splits) {
    shape.back() = n;
    auto piece = splits.size() == 1 ? y : y.narrow(1, start, n).contiguous();
    out.push_back(piece.view(shape));
    start += n;
  }
  return out;
}

// Float16 weights (an unquantized lm_head) widened to float32 in registers (F16C): half the
// bytes of a float32 head, the same products as a float32 matmul over those float16 values.
static inline void f16_rows2(const float* x, const uint16_t* w0, const uint16_t* w1, int64_t K,
                             float* y0, float* y1) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
         a3 = _mm256_setzero_ps(), b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps(),
         b2 = _mm256_setzero_ps(), b3 = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    const __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
    const __m256 x2 = _mm256_loadu_ps(x + k + 16), x3 = _mm256_loadu_ps(x + k + 24);
#define H(p) _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))
    a0 = _mm256_fmadd_ps(H(w0 + k), x0, a0); a1 = _mm256_fmadd_ps(H(w0 + k + 8), x1, a1);
    a2 = _mm256_fmadd_ps(H(w0 + k + 16), x2, a2); a3 = _mm256_fmadd_ps(H(w0 + k + 24), x3, a3);
    b0 = _mm256_fmadd_ps(H(w1 + k), x0, b0); b1 = _mm256_fmadd_ps(H(w1 + k + 8), x1, b1);
    b2 = _mm256_fmadd_ps(H(w1 + k + 16), x2, b2); b3 = _mm256_fmadd_ps(H(w1 + k + 24), x3, b3);
#undef H
  }
  *y0 = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  *y1 = hsum(_mm256_add_ps(_mm256_add_ps(b0, b1), _mm256_add_ps(b2, b3)));
}

torch::Tensor f16_linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(w.scalar_type() == torch::kHalf && w.is_contiguous(), "w must be float16");
  TORCH_CHECK(x.size(-1) == K && K % 32 == 0, "f16_linear needs K, a multiple of 32, columns");
  auto x2 = x.reshape({-1, K}).to(torch::kFloat).contiguous();
  const int64_t M = x2.size(0);
  auto y = torch::empty({M, N}, x2.options());
  if (M <= GEMV_ROWS) {
    const float* X = x2.data_ptr<float>();
    const uint16_t* W = reinterpret_cast<const uint16_t*>(w.data_ptr<at::Half>());
    float* Y = y.data_ptr<float>();
    at::parallel_for(0, (N + 1) / 2, 64, [&](int64_t p0, int64_t p1) {
      float spare;
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t n = 2 * p, n1 = std::min(n + 1, N - 1);
        for (int64_t m = 0; m < M; ++m)
          f16_rows2(X + m * K, W + n * K, W + n1 * K, K, Y + m * N + n,
                    n1 == n ? &spare : Y + m * N + n1);
      }
    });
  } else {  // prefill: widen a block of rows at a time, never the whole table
    for (int64_t n0 = 0; n0 < N; n0 += 4096) {
      const int64_t nb = std::min<int64_t>(4096, N - n0);
      y.narrow(1, n0, nb).copy_(at::mm(x2, w.narrow(0, n0, nb).to(torch::kFloat).t()));
    }
  }
  if (bias.has_value()) y.add_(*bias);
  if (x.scalar_type() != torch::kFloat) y = y.to(x.scalar_type());
  auto shape = x.sizes().vec();
  shape.back() = N;
  return y.view(shape);
}

torch::Tensor int8_mm(torch::Tensor x, torch::Tensor w, torch::Tensor scale) {
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  check(x, K);
  TORCH_CHECK(K % 32 == 0, "int8 kernel needs a multiple of 32 input columns");
  auto y = torch::empty({M, N}, x.options());
  const float* X = x.data_ptr<float>();
  const int8_t* W = w.data_ptr<int8_t>();
  const float* S = scale.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  at::parallel_for(0, N, 8, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* wn = W + n * K;
      for (int64_t m = 0; m < M; ++m) {
        const float* xm = X + m * K;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
               a3 = _mm256_setzero_ps();
        for (int64_t k = 0; k < K; k += 32) {
          a0 = _mm256_fmadd_ps(widen8(wn + k), _mm256_loadu_ps(xm + k), a0);
          a1 = _mm256_fmadd_ps(widen8(wn + k + 8), _mm256_loadu_ps(xm + k + 8), a1);
          a2 = _mm256_fmadd_ps(widen8(wn + k + 16), _mm256_loadu_ps(xm + k + 16), a2);
          a3 = _mm256_fmadd_ps(widen8(wn + k + 24), _mm256_loadu_ps(xm + k + 24), a3);
        }
        Y[m * N + n] = S[n] * hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
      }
    }
  });
  return y;
}

// -- one-token decode glue (secateur.runtime.decode): each a single call where torch needs
// several small ops at ~5-15 us of dispatch each, float32, contiguous last dimension.

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && w.scalar_type() == torch::kFloat,
              "rms_norm takes float32");
  auto xc = x.contiguous();
  const int64_t D = xc.size(-1), R = xc.numel() / D;
  TORCH_CHECK(w.numel() == D, "rms_norm: weight size");
  auto y = torch::empty_like(xc);
  const float* X = xc.data_ptr<float>();
  const float* W = w.contiguous().data_ptr<float>();
  float* Y = y.data_ptr<float>();
  for (int64_t r = 0; r < R; ++r) {
    const float* xr = X + r * D;
    float ss = 0.f;
    for (int64_t d = 0; d < D; ++d) ss += xr[d] * xr[d];
    const float inv = 1.f / std::sqrt(ss / D + static_cast<float>(eps));
    for (int64_t d = 0; d < D; ++d) Y[r * D + d] = W[d] * (xr[d] * inv);
  }
  return y;
}

// x (B, H, D) in place: x * cos + rotate_half(x) * sin, cos / sin (B, D) or (1, D).
void rotary_(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == torch::kFloat, "rotary_: float32 x");
  const int64_t B = x.size(0), H = x.size(1), D = x.size(2), half = D / 2;
  auto c = cos.contiguous(), s = sin.contiguous();
  const float* C = c.data_ptr<float>();
  const float* S = s.data_ptr<float>();
  float* X = x.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      float* v = X + (b * H + h) * D;
      const int64_t row = c.size(0) == 1 ? 0 : b;
      const float* cb = C + row * D;
      const float* sb = S + row * D;
      for (int64_t d = 0; d < half; ++d) {
        const float lo = v[d], hi = v[d + half];
        v[d] = lo * cb[d] - hi * sb[d];
        v[d + half] = hi * cb[d + half] + lo * sb[d + half];
      }
    }
}

// Attention of one query per sequence over its cached keys: q (B, H, D); k, v (B, KVH, T, D)
// with any strides but a contiguous last dimension; H a multiple of KVH (grouped queries).
torch::Tensor attend_one(torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat && k.scalar_type() == torch::kFloat &&
              v.scalar_type() == torch::kFloat, "attend_one takes float32");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "attend_one: keys need a contiguous last dim");
  auto qc = q.contiguous();
  const int64_t B = qc.size(0), H = qc.size(1), D = qc.size(2), KVH = k.size(1), T = k.size(2);
  TORCH_CHECK(H % KVH == 0 && k.size(3) == D, "attend_one: shapes");
  auto out = torch::empty({B, H * D}, qc.options());
  const float* Q = qc.data_ptr<float>();
  const float* K = k.data_ptr<float>();
  const float* V = v.data_ptr<float>();
  float* O = out.data_ptr<float>();
  const int64_t group = H / KVH;
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);
  const int64_t grain = T * D >= 16384 ? 1 : B * H;  // short caches: one thread, no fork
  at::parallel_for(0, B * H, grain, [&](int64_t i0, int64_t i1) {
    std::vector<float> p(T);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H, kv = h / group;
      const float* qv = Q + i * D;
      const float* kb = K + b * ks0 + kv * ks1;
      const float* vb = V + b * vs0 + kv * vs1;
      float best = -INFINITY;
      for (int64_t t = 0; t < T; ++t) {
        const float* kt = kb + t * ks2;
        float dot = 0.f;
        for (int64_t d = 0; d < D; ++d) dot += qv[d] * kt[d];
        p[t] = dot * static_cast<float>(scale);
        best = std::max(best, p[t]);
      }
      float total = 0.f;
      for (int64_t t = 0; t < T; ++t) { p[t] = std::exp(p[t] - best); total += p[t]; }
      float* o = O + b * H * D + h * D;
      for (int64_t d = 0; d < D; ++d) o[d] = 0.f;
      for (int64_t t = 0; t < T; ++t) {
        const float w = p[t] / total;
        const float* vt = vb + t * vs2;
        for (int64_t d = 0; d < D; ++d) o[d] += w * vt[d];
      }
    }
  });
  return out;
}

// silu(g) * u, elementwise.
torch::Tensor silu_mul(torch::Tensor g, torch::Tensor u) {
  TORCH_CHECK(g.scalar_type() == torch::kFloat && u.scalar_type() == torch::kFloat &&
              g.sizes() == u.sizes(), "silu_mul: two float32 tensors of one shape");
  auto gc = g.contiguous(), uc = u.contiguous();
  auto y = torch::empty_like(gc);
  const float* G = gc.data_ptr<float>();
  const float* U = uc.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  const int64_t n = gc.numel();
  for (int64_t i = 0; i < n; ++i) Y[i] = G[i] / (1.f + std::exp(-G[i])) * U[i];
  return y;
}
"""

_kernels = None
_tried = False


def _cpu_has_avx2() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def kernels():
    """The compiled module, or None where it cannot be had (then torch's kernels are used)."""
    global _kernels, _tried
    if _tried:
        return _kernels
    _tried = True
    if os.environ.get("SECATEUR_NO_AVX2") == "1" or not _cpu_has_avx2():
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        _kernels = load_inline(
            name="secateur_avx2_v7", cpp_sources=[SOURCE.replace("@GEMV_ROWS@", str(GEMV_ROWS))],
            functions=["int4_mm", "int4_dequantize", "int4_linear", "f16_linear", "int8_mm",
                       "rms_norm", "rotary_", "attend_one", "silu_mul"],
            extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False)
    except Exception as err:  # no compiler, no headers: fall back, say why once
        log.warning("secateur's AVX2 kernels could not be built (%s: %s); using torch's "
                    "integer kernels, which are slow without AVX-512", type(err).__name__,
                    str(err).splitlines()[0][:200] if str(err) else "")
        _kernels = None
    return _kernels


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes in [0, 15], K a multiple of 32 -> (N, K / 2) uint8 in the layout above."""
    n, k = codes.shape
    blocks = codes.to(torch.uint8).reshape(n, k // 16, 2, 8)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, k // 2).contiguous()
