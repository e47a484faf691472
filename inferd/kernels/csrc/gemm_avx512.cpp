// Matmuls of decode batches (7 to a few dozen rows) against a GGUF's 4-bit blocks on CPUs with
// AVX512-BF16 but no AMX (Zen 4): the counterpart of gemm_amx.cpp.
//
// Why: past ~6 rows the skinny kernel (gemv.cpp) is bound by its per-row, per-block work (one
// 32-value table lookup per block and row, one scale multiply per dot product), and a kernel
// that dequantizes blocks to bf16 first spends as long on the lookups as on the arithmetic
// (measured on Zen 4 at 16 rows: ~7 ms of dequantization against ~12 ms of dot products per
// step of SmolLM2's layers; the two run on the same vector units, so they do not overlap).
//
// So the blocks are regrouped once at load (quant.Q4Weights.tiles) into tiles of 16 weight rows
// in vdpbf16ps's pair layout: 32 bytes hold, for one block and two k pairs, the 2 x 16 x 2
// nibbles of those 16 rows, and become two bf16 weight vectors with one zero-extension, one
// shift and two ORs. A nibble q becomes the bf16 number 128 + q (exactly: 0x4300 | q), so
//   x . w_row = sum_b d_b (x_b . (q_b + 128)) + (m_b - 128 d_b) sum(x_b)
// with the weights exact, as the skinny kernel has them. Per tile and block, each row of x
// accumulates 16 dot products (one per k pair, x's pair broadcast, 16 weight rows in the lanes)
// and then two fmas apply the block's scales to all 16 outputs at once. No transposes, no
// horizontal sums: the lanes are the outputs.
#include "api.h"
#include "common.h"

namespace inferd {
namespace {

#if defined(__AVX512BF16__)
constexpr int kTile = 16;      // weight rows per tile (the 16 lanes of an accumulator)
constexpr int kMaxChunk = 12;  // rows of x per pass: 12 block sums + 12 totals in registers

// Rows [0, MC) of y for one tile (its weight rows n .. n + 15): tq the tile's nibbles
// [nb, 8, 32], td and tm its scales [nb, 16] (tm = m - 128 d), sx the block sums of x [MC, nb].
template <int MC>
void tile_rows(bf16* y, int64_t ldy, const bf16* x, int64_t ldx, const float* sx,
               const uint8_t* tq, const float* td, const float* tm, int64_t nb, __m512 bias,
               __mmask16 keep) {
  const __m512i low4 = _mm512_set1_epi16(0x0f), bf128 = _mm512_set1_epi16(0x4300);
  __m512 acc[MC];
  for (int m = 0; m < MC; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512 blk[MC];
    for (int m = 0; m < MC; ++m) blk[m] = _mm512_setzero_ps();
    const uint8_t* q = tq + b * 256;
    const bf16* xk = x + 32 * b;
#pragma GCC unroll 8
    for (int pp = 0; pp < 8; ++pp) {  // k pairs 2 pp and 2 pp + 1 of the block
      const __m512i v = _mm512_cvtepu8_epi16(_mm256_load_si256(reinterpret_cast<const __m256i*>(q + 32 * pp)));
      const __m512bh w0 = reinterpret_cast<__m512bh>(_mm512_or_si512(_mm512_and_si512(v, low4), bf128));
      const __m512bh w1 = reinterpret_cast<__m512bh>(_mm512_or_si512(_mm512_srli_epi16(v, 4), bf128));
      for (int m = 0; m < MC; ++m) {
        const int32_t* xp = reinterpret_cast<const int32_t*>(xk + m * ldx + 4 * pp);
        blk[m] = _mm512_dpbf16_ps(blk[m], w0, reinterpret_cast<__m512bh>(_mm512_set1_epi32(xp[0])));
        blk[m] = _mm512_dpbf16_ps(blk[m], w1, reinterpret_cast<__m512bh>(_mm512_set1_epi32(xp[1])));
      }
    }
    const __m512 dv = _mm512_load_ps(td + 16 * b), mv = _mm512_load_ps(tm + 16 * b);
    for (int m = 0; m < MC; ++m)
      acc[m] = _mm512_fmadd_ps(mv, _mm512_set1_ps(sx[m * nb + b]), _mm512_fmadd_ps(dv, blk[m], acc[m]));
  }
  for (int m = 0; m < MC; ++m)
    _mm256_mask_storeu_epi16(y + m * ldy, keep, bf16_bits(_mm512_add_ps(acc[m], bias)));
}

void tile_chunk(int mc, bf16* y, int64_t ldy, const bf16* x, int64_t ldx, const float* sx,
                const uint8_t* tq, const float* td, const float* tm, int64_t nb, __m512 bias,
                __mmask16 keep) {
  switch (mc) {
#define INFERD_MC(c) \
  case c: tile_rows<c>(y, ldy, x, ldx, sx, tq, td, tm, nb, bias, keep); break;
    INFERD_MC(1) INFERD_MC(2) INFERD_MC(3) INFERD_MC(4) INFERD_MC(5) INFERD_MC(6)
    INFERD_MC(7) INFERD_MC(8) INFERD_MC(9) INFERD_MC(10) INFERD_MC(11) INFERD_MC(12)
#undef INFERD_MC
    default: break;
  }
}
#endif

}  // namespace
}  // namespace inferd

using namespace inferd;

extern "C" {

// y [M, N] bf16 (row stride ldy) = x [M, K] bf16 (row stride ldx) . W^T + bias, W as 4-bit tiles
// (quant.Q4Tiles): tq uint8 [ceil(N/16), K/32, 8, 32] (64-byte aligned), td and tm float32
// [ceil(N/16), K/32, 16] (tm = m - 128 d; rows past N zero). Any M >= 1; the bias is added in
// fp32 and the sum rounded once.
void inferd_gemm_q4_avx512(void* y, int64_t ldy, const void* x, int64_t ldx, const uint8_t* tq,
                           const float* td, const float* tm, const void* bias, int64_t M,
                           int64_t N, int64_t K) {
#if defined(__AVX512BF16__)
  if (M <= 0 || N <= 0) return;
  const int64_t nb = K / 32, tiles = (N + kTile - 1) / kTile;
  // rows of x in equal chunks of at most kMaxChunk (16 rows: 8 + 8, not 12 + 4)
  const int64_t chunks = (M + kMaxChunk - 1) / kMaxChunk, chunk = (M + chunks - 1) / chunks;
  const bf16* xb = static_cast<const bf16*>(x);
  const bf16* bb = static_cast<const bf16*>(bias);
  bf16* yb = static_cast<bf16*>(y);
  std::vector<float> sx(M * nb);  // fp32 sums of x's blocks
  for (int64_t r = 0; r < M; ++r)
    for (int64_t b = 0; b < nb; ++b) {
      const __m512 lo = load16(xb + r * ldx + 32 * b), hi = load16(xb + r * ldx + 32 * b + 16);
      sx[r * nb + b] = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
    }
#pragma omp parallel for schedule(dynamic, 1)  // a descheduled thread must not hold up the other
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t n = t * kTile, cols = std::min<int64_t>(kTile, N - n);
    const uint8_t* tile_q = tq + t * nb * 256;
    if (t + 2 < tiles) {  // a later tile's nibbles, while this one computes
      const char* ahead = reinterpret_cast<const char*>(tile_q + 2 * nb * 256);
      for (int64_t off = 0; off < nb * 256; off += 64) __builtin_prefetch(ahead + off);
    }
    __m512 bias_v = _mm512_setzero_ps();
    if (bb) {
      alignas(64) bf16 tmp[kTile] = {};
      std::memcpy(tmp, bb + n, cols * sizeof(bf16));
      bias_v = load16(tmp);
    }
    const __mmask16 keep = cols == kTile ? 0xffff : static_cast<__mmask16>((1u << cols) - 1);
    for (int64_t m0 = 0; m0 < M; m0 += chunk)
      tile_chunk(static_cast<int>(std::min<int64_t>(chunk, M - m0)), yb + m0 * ldy + n, ldy,
                 xb + m0 * ldx, ldx, sx.data() + m0 * nb, tile_q, td + t * nb * 16,
                 tm + t * nb * 16, nb, bias_v, keep);
  }
#else
  (void)y; (void)ldy; (void)x; (void)ldx; (void)tq; (void)td; (void)tm; (void)bias; (void)M;
  (void)N; (void)K;
#endif
}

}  // extern "C"
