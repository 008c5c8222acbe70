"""AVX2 kernels for int4 / int8 weight-only linears, compiled on first use.

Why: torch 2.13's CPU kernels for packed integer weights (`_weight_int4pack_mm_for_cpu`,
`_weight_int8pack_mm`, `_int_mm`) have fast paths for AVX-512 only; on an AVX2 machine they run
8-60x slower than a dense float32 matmul (bench/quantization.py --kernels), so a 4-bit model
would decode slower than the dense one. These kernels read 4-bit (or 8-bit) codes, widen them
to float in registers and accumulate with FMA against float32 activations: the weights cross
the memory bus at 0.5 (or 1) byte each, which is what batch-1 decode is bound by. Results equal
the dequantized matmul up to float summation order.

Layout (int4): per output row, each block of 32 columns is 16 bytes; byte j holds the code of
column j in its low nibble and of column j + 16 in its high nibble, so the two halves of a block
unpack into contiguous runs of 16 columns. Dequantization per group g: w = q * s - zs with
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

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

static inline void unpack32(const uint8_t* p, __m256& w0, __m256& w1, __m256& w2, __m256& w3) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(b, mask);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
  w0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
  w1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
  w2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
  w3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
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

torch::Tensor int4_mm(torch::Tensor x, torch::Tensor q, torch::Tensor scales, torch::Tensor zs,
                      int64_t group) {
  const int64_t M = x.size(0), N = q.size(0), K = q.size(1) * 2, G = scales.size(1);
  check(x, K);
  TORCH_CHECK(group % 32 == 0 && G * group == K, "groups must be multiples of 32 columns");
  auto y = torch::empty({M, N}, x.options());
  auto xsum = x.view({M, G, group}).sum(-1).contiguous();
  const float* X = x.data_ptr<float>();
  const float* XS = xsum.data_ptr<float>();
  const uint8_t* Q = q.data_ptr<uint8_t>();
  const float* S = scales.data_ptr<float>();
  const float* Z = zs.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  at::parallel_for(0, N, 8, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* qn = Q + n * (K / 2);
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int64_t mb = std::min<int64_t>(4, M - m0);
        float acc[4] = {0.f, 0.f, 0.f, 0.f};
        for (int64_t g = 0; g < G; ++g) {
          __m256 d[4][2];
          for (int i = 0; i < 4; ++i) d[i][0] = d[i][1] = _mm256_setzero_ps();
          for (int64_t k = g * group; k < (g + 1) * group; k += 32) {
            __m256 w0, w1, w2, w3;
            unpack32(qn + k / 2, w0, w1, w2, w3);
            for (int64_t i = 0; i < mb; ++i) {
              const float* xp = X + (m0 + i) * K + k;
              d[i][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp), d[i][0]);
              d[i][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp + 8), d[i][1]);
              d[i][0] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xp + 16), d[i][0]);
              d[i][1] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xp + 24), d[i][1]);
            }
          }
          const float s = S[n * G + g], z = Z[n * G + g];
          for (int64_t i = 0; i < mb; ++i)
            acc[i] += s * hsum(_mm256_add_ps(d[i][0], d[i][1])) - z * XS[(m0 + i) * G + g];
        }
        for (int64_t i = 0; i < mb; ++i) Y[(m0 + i) * N + n] = acc[i];
      }
    }
  });
  return y;
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
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int64_t mb = std::min<int64_t>(4, M - m0);
        __m256 d[4][2];
        for (int i = 0; i < 4; ++i) d[i][0] = d[i][1] = _mm256_setzero_ps();
        for (int64_t k = 0; k < K; k += 32) {
          const __m256 w0 = widen8(wn + k), w1 = widen8(wn + k + 8);
          const __m256 w2 = widen8(wn + k + 16), w3 = widen8(wn + k + 24);
          for (int64_t i = 0; i < mb; ++i) {
            const float* xp = X + (m0 + i) * K + k;
            d[i][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp), d[i][0]);
            d[i][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp + 8), d[i][1]);
            d[i][0] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xp + 16), d[i][0]);
            d[i][1] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xp + 24), d[i][1]);
          }
        }
        for (int64_t i = 0; i < mb; ++i)
          Y[(m0 + i) * N + n] = S[n] * hsum(_mm256_add_ps(d[i][0], d[i][1]));
      }
    }
  });
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
            name="secateur_avx2_v1", cpp_sources=[SOURCE],
            functions=["int4_mm", "int4_dequantize", "int8_mm"],
            extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"], extra_ldflags=["-fopenmp"],
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
    blocks = codes.to(torch.uint8).reshape(n, k // 32, 2, 16)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, k // 2).contiguous()
