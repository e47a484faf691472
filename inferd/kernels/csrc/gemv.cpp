// Skinny matmuls y = x W^T (+ b) for a few rows of x (decode steps), bf16 weights [N, K] in
// their checkpoint layout, fp32 accumulation.
//
// Why hand-written: a decode step with few sequences is a pass over every weight, so its speed
// is the speed the weights stream from memory. oneDNN's kernels read them at ~11 GB/s on this
// machine for M <= 64 (packed or not); a plain row-streaming loop of vdpbf16ps reaches about
// twice that, and needs no second, repacked copy of the weights.
#include "api.h"
#include "common.h"

#include <type_traits>

namespace inferd {
namespace {

constexpr int64_t kRowChunk = 64;  // weight rows per unit of work; a multiple of every R

// rows(std::integral_constant<int, M>{}, n0, n1) over [0, N) in kRowChunk-row chunks handed
// out dynamically (on a shared machine one thread is often descheduled for a while, and a
// static half-and-half split would make every call wait for it); M in [1, 8].
template <typename Fn>
void for_row_chunks(int64_t M, int64_t N, Fn rows) {
  const int64_t chunks = (N + kRowChunk - 1) / kRowChunk;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t n0 = c * kRowChunk, n1 = std::min(N, n0 + kRowChunk);
    switch (M) {
#define INFERD_M(m) \
  case m: rows(std::integral_constant<int, m>{}, n0, n1); break;
      INFERD_M(1) INFERD_M(2) INFERD_M(3) INFERD_M(4) INFERD_M(5) INFERD_M(6) INFERD_M(7) INFERD_M(8)
#undef INFERD_M
      default: break;
    }
  }
}

#if defined(__AVX512BF16__)
// Rows [n0, n1) of y for M rows of x, R weight rows at a time (M * R <= 16 accumulators, in
// registers). Each weight row streams once; the next group's rows are prefetched ahead of use.
// Per row of x the R partial vectors reduce in one transpose-and-add tree.
template <int M, int R>
void gemv_rows(float* y32, bf16* y16, int64_t ldy, const bf16* x, int64_t ldx, const bf16* w,
               int64_t K, const bf16* bias, int64_t n0, int64_t n1) {
  const int64_t kfull = K & ~int64_t(31);
  const __mmask32 tail = static_cast<__mmask32>((1u << (K - kfull)) - 1);
  constexpr int64_t kAhead = 2;  // groups of rows prefetched ahead
  for (int64_t n = n0; n < n1; n += R) {
    const int64_t rows = std::min<int64_t>(R, n1 - n);
    const char* ahead = reinterpret_cast<const char*>(w + (n + kAhead * R) * K);
    const char* w_end = reinterpret_cast<const char*>(w + n1 * K);
    for (int64_t off = 0; off < R * K * 2 && ahead + off < w_end; off += 64)
      __builtin_prefetch(ahead + off);
    __m512 acc[M][R];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < kfull; k += 32) {
      __m512bh xv[M];
      for (int m = 0; m < M; ++m)
        xv[m] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(x + m * ldx + k));
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        if (r < rows) {
          const __m512bh wv = reinterpret_cast<__m512bh>(_mm512_loadu_si512(w + (n + r) * K + k));
          for (int m = 0; m < M; ++m) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], wv, xv[m]);
        }
      }
    }
    if (kfull < K) {
      __m512bh xv[M];
      for (int m = 0; m < M; ++m)
        xv[m] = reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(tail, x + m * ldx + kfull));
      for (int r = 0; r < R; ++r) {
        if (r < rows) {
          const __m512bh wv =
              reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(tail, w + (n + r) * K + kfull));
          for (int m = 0; m < M; ++m) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], wv, xv[m]);
        }
      }
    }
    alignas(64) bf16 bt[16] = {};
    if (bias)
      for (int64_t r = 0; r < rows; ++r) bt[r] = bias[n + r];
    // the bias is added in fp32 and the sum rounded once at the store, as oneDNN does
    const __m512 b = load16(bt);
    for (int m = 0; m < M; ++m) {
      __m512 parts[16];
      for (int r = 0; r < 16; ++r) parts[r] = r < R ? acc[m][r] : _mm512_setzero_ps();
      const __m512 v = _mm512_add_ps(hsum16(parts), b);
      if (y32) {
        _mm512_mask_storeu_ps(y32 + m * ldy + n, static_cast<__mmask16>((1u << rows) - 1),
                              round_to(static_cast<bf16*>(nullptr), v));
      } else {
        alignas(64) bf16 tmp[16];
        store16(tmp, v);
        std::memcpy(y16 + m * ldy + n, tmp, rows * sizeof(bf16));
      }
    }
  }
}
#endif

#if defined(__AVX512BF16__)
// Rows [n0, n1) of y from 4-bit weights in GGUF's Q4_0/Q4_1 blocks of 32 along K:
//   w[n, 32b + j] = d[n, b] * q + m[n, b],  q = low nibble of qs[n, b, j] (j < 16) or the high
//   nibble of qs[n, b, j - 16]  (Q4_0 is m = -8 d).
// So x . w_row = sum_b d_b (x_b . q_b) + sum_b m_b sum(x_b): the nibbles become bf16 integers
// (exact) through a 16-entry table (vpermw), x_b . q_b is one vdpbf16ps, and the row sums of x
// per block (sx) are computed once per call. The weights never exist in 16 or 32 bits.
template <int M>
void gemv_q4_rows(float* y32, bf16* y16, int64_t ldy, const bf16* x, int64_t ldx,
                  const float* sx, const uint8_t* qs, const float* d, const float* mm,
                  const bf16* bias, int64_t nb, int64_t n0, int64_t n1) {
  const __m512i table = _mm512_setr_epi32(  // bf16 bits of 0.0 .. 15.0, twice
      0x3f800000, 0x40404000, 0x40a04080, 0x40e040c0, 0x41104100, 0x41304120, 0x41504140,
      0x41704160, 0x3f800000, 0x40404000, 0x40a04080, 0x40e040c0, 0x41104100, 0x41304120,
      0x41504140, 0x41704160);
  const __m256i low4 = _mm256_set1_epi16(0x0f);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* qrow = qs + n * nb * 16;
    const float* drow = d + n * nb;
    const float* mrow = mm + n * nb;
    if (n + 2 < n1) {
      const char* ahead = reinterpret_cast<const char*>(qrow + 2 * nb * 16);
      for (int64_t off = 0; off < nb * 16; off += 64) __builtin_prefetch(ahead + off);
    }
    // two accumulators per row of x (even / odd blocks): the fma chain is the latency bound
    __m512 acc[M][2];
    __m512 mt[M];
    for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = mt[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      const __m256i w16 = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qrow + b * 16)));
      const __m512i idx = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(w16, low4)),
                                             _mm256_srli_epi16(w16, 4), 1);
      const __m512bh qv = reinterpret_cast<__m512bh>(_mm512_permutexvar_epi16(idx, table));
      const __m512 db = _mm512_set1_ps(drow[b]);
      for (int m = 0; m < M; ++m) {
        const __m512 part = _mm512_dpbf16_ps(_mm512_setzero_ps(), qv, reinterpret_cast<__m512bh>(
                                                 _mm512_loadu_si512(x + m * ldx + 32 * b)));
        acc[m][b & 1] = _mm512_fmadd_ps(db, part, acc[m][b & 1]);
      }
    }
    // sum_b m_b sum(x_b), 16 blocks per vector
    for (int64_t b = 0; b < nb; b += 16) {
      const __mmask16 k = nb - b >= 16 ? 0xffff : static_cast<__mmask16>((1u << (nb - b)) - 1);
      const __m512 mv = _mm512_maskz_loadu_ps(k, mrow + b);
      for (int m = 0; m < M; ++m) mt[m] = _mm512_fmadd_ps(mv, _mm512_maskz_loadu_ps(k, sx + m * nb + b), mt[m]);
    }
    for (int m = 0; m < M; ++m) acc[m][0] = _mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]), mt[m]);
    const float bv = bias ? to_float(bias[n]) : 0.f;
    for (int m = 0; m < M; ++m) {
      const float v = _mm512_reduce_add_ps(acc[m][0]) + bv;
      if (y32) y32[m * ldy + n] = to_float(from_float<bf16>(v));
      else y16[m * ldy + n] = from_float<bf16>(v);
    }
  }
}
#endif

#if defined(__AVX512BF16__)
// Rows [n0, n1) of y from GGUF Q8_0 blocks: w[n, 32b + j] = d[n, b] * q (q int8, exact in
// bf16), so x . w_row = sum_b d_b (x_b . q_b), one vdpbf16ps per block.
template <int M>
void gemv_q8_rows(float* y32, bf16* y16, int64_t ldy, const bf16* x, int64_t ldx,
                  const int8_t* qs, const float* d, const bf16* bias, int64_t nb, int64_t n0,
                  int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* qrow = qs + n * nb * 32;
    const float* drow = d + n * nb;
    if (n + 2 < n1) {
      const char* ahead = reinterpret_cast<const char*>(qrow + 2 * nb * 32);
      for (int64_t off = 0; off < nb * 32; off += 64) __builtin_prefetch(ahead + off);
    }
    __m512 acc[M][2];
    for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      const int8_t* q = qrow + b * 32;
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
      const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16))));
      const __m512bh qv = _mm512_cvtne2ps_pbh(hi, lo);
      const __m512 db = _mm512_set1_ps(drow[b]);
      for (int m = 0; m < M; ++m) {
        const __m512 part = _mm512_dpbf16_ps(_mm512_setzero_ps(), qv, reinterpret_cast<__m512bh>(
                                                 _mm512_loadu_si512(x + m * ldx + 32 * b)));
        acc[m][b & 1] = _mm512_fmadd_ps(db, part, acc[m][b & 1]);
      }
    }
    const float bv = bias ? to_float(bias[n]) : 0.f;
    for (int m = 0; m < M; ++m) {
      const float v = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1])) + bv;
      if (y32) y32[m * ldy + n] = to_float(from_float<bf16>(v));
      else y16[m * ldy + n] = from_float<bf16>(v);
    }
  }
}
#endif

}  // namespace
}  // namespace inferd

using namespace inferd;

extern "C" {

// 1 when this build has the bf16 skinny matmul (AVX512-BF16), else 0 (callers use torch).
int inferd_has_gemv_bf16() {
#if defined(__AVX512BF16__)
  return 1;
#else
  return 0;
#endif
}

// y [M, N] (row stride ldy) = x [M, K] (row stride ldx) W^T + bias, W [N, K] contiguous bf16,
// bias [N] bf16 or null; M in [1, 8]. y is bf16, or float32 holding the bf16-rounded values
// when y_is_f32 (logits). Weight rows are split across threads in 16-row groups.
void inferd_gemv_bf16(void* y, int y_is_f32, int64_t ldy, const void* x, int64_t ldx,
                      const void* w, const void* bias, int64_t M, int64_t N, int64_t K) {
#if defined(__AVX512BF16__)
  const bf16* xb = static_cast<const bf16*>(x);
  const bf16* wb = static_cast<const bf16*>(w);
  const bf16* bb = static_cast<const bf16*>(bias);
  float* y32 = y_is_f32 ? static_cast<float*>(y) : nullptr;
  bf16* y16 = y_is_f32 ? nullptr : static_cast<bf16*>(y);
  for_row_chunks(M, N, [&](auto mc, int64_t n0, int64_t n1) {
    constexpr int m = decltype(mc)::value;
    gemv_rows<m, (m == 1 ? 16 : m == 2 ? 8 : m <= 4 ? 4 : 2)>(y32, y16, ldy, xb, ldx, wb, K, bb,
                                                             n0, n1);
  });
#else
  (void)y; (void)y_is_f32; (void)ldy; (void)x; (void)ldx; (void)w; (void)bias; (void)M; (void)N; (void)K;
#endif
}

// As inferd_gemv_bf16 with 4-bit weights (see gemv_q4_rows): qs uint8 [N, K/32, 16], d and m
// float32 [N, K/32]; K a multiple of 32.
void inferd_gemv_q4(void* y, int y_is_f32, int64_t ldy, const void* x, int64_t ldx,
                    const uint8_t* qs, const float* d, const float* m, const void* bias, int64_t M,
                    int64_t N, int64_t K) {
#if defined(__AVX512BF16__)
  const bf16* xb = static_cast<const bf16*>(x);
  const int64_t nb = K / 32;
  std::vector<float> sx(M * nb);
  for (int64_t r = 0; r < M; ++r)
    for (int64_t b = 0; b < nb; ++b) {
      float s = 0.f;
      for (int j = 0; j < 32; ++j) s += to_float(xb[r * ldx + 32 * b + j]);
      sx[r * nb + b] = s;
    }
  float* y32 = y_is_f32 ? static_cast<float*>(y) : nullptr;
  bf16* y16 = y_is_f32 ? nullptr : static_cast<bf16*>(y);
  const bf16* bb = static_cast<const bf16*>(bias);
  for_row_chunks(M, N, [&](auto mc, int64_t n0, int64_t n1) {
    gemv_q4_rows<decltype(mc)::value>(y32, y16, ldy, xb, ldx, sx.data(), qs, d, m, bb, nb, n0, n1);
  });
#else
  (void)y; (void)y_is_f32; (void)ldy; (void)x; (void)ldx; (void)qs; (void)d; (void)m; (void)bias;
  (void)M; (void)N; (void)K;
#endif
}

// As inferd_gemv_q4 with Q8_0 blocks: qs int8 [N, K/32, 32], d float32 [N, K/32].
void inferd_gemv_q8(void* y, int y_is_f32, int64_t ldy, const void* x, int64_t ldx,
                    const int8_t* qs, const float* d, const void* bias, int64_t M, int64_t N,
                    int64_t K) {
#if defined(__AVX512BF16__)
  const bf16* xb = static_cast<const bf16*>(x);
  float* y32 = y_is_f32 ? static_cast<float*>(y) : nullptr;
  bf16* y16 = y_is_f32 ? nullptr : static_cast<bf16*>(y);
  const bf16* bb = static_cast<const bf16*>(bias);
  const int64_t nb = K / 32;
  for_row_chunks(M, N, [&](auto mc, int64_t n0, int64_t n1) {
    gemv_q8_rows<decltype(mc)::value>(y32, y16, ldy, xb, ldx, qs, d, bb, nb, n0, n1);
  });
#else
  (void)y; (void)y_is_f32; (void)ldy; (void)x; (void)ldx; (void)qs; (void)d; (void)bias; (void)M;
  (void)N; (void)K;
#endif
}

}  // extern "C"
