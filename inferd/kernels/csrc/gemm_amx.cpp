// Matmuls of decode batches (a few to a few dozen rows) against a GGUF's 4-bit blocks, on AMX.
//
// Why: from 4 rows up, the skinny kernels (gemv.cpp) become compute-bound, and oneDNN's bf16
// kernels are bound by reading bf16 weights (~11-18 GB/s here). Dequantizing the 4-bit blocks
// into bf16 tiles on the fly reads 2.8x fewer bytes, and AMX makes the arithmetic nearly free.
//
// Shape of the computation, per thread (a range of weight panels):
//   C^T [16 n x 16 m] += A [16 n x 32 k] . B [32 k x 16 m]   (tdpbf16ps, fp32 accumulation)
// A is a tile of weight rows, each 32-value block dequantized into an L1 buffer right before
// its tile load: the block goes through a 16-entry table (bf16(d q + m) for q = 0..15, computed
// as the float dequantizer computes it, so these are the very weights the bf16 path loads).
// B is x in AMX's pair layout (row r of block b holds (x[m][32b + 2r], x[m][32b + 2r + 1]) for
// 16 m), transposed once per call and shared by all threads. C^T tiles transpose back on the
// way out. Weights are the big operand, so they are the one never transposed, and each is
// dequantized once per call for up to 64 rows of x:
//   - up to 32 rows: 2 weight tiles (32 rows) x 1-2 x tiles;
//   - 33-64 rows: 1 weight tile x 3-4 x tiles, for each 16-row half of a 32-row panel, its
//     blocks dequantized into L1 as for fewer rows (64 rows over 30 SmolLM2 layers: 16.1 ->
//     13.8 ms against dequantizing the whole panel first and reading it back twice);
//   - more: the same in passes of 64 rows, each dequantizing again (no caller needs it).
// A thread takes whole 32-row panels: with 16-row ones the two threads wrote the halves of
// the same 64-byte output lines (~20% slower at 48-64 rows).
#include "api.h"
#include "common.h"

#if defined(INFERD_HAS_AMX)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace inferd {
namespace {

#if defined(INFERD_HAS_AMX)

// One 32-value block as bf16: its 16 possible values, d * q + m in fp32 (two roundings) rounded
// to bf16, looked up by the nibbles.
inline void dequant_block(bf16* dst, const uint8_t* qs, const float* d, const float* m,
                          int64_t blk) {
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 vals = _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(d[blk]), iota),
                                    _mm512_set1_ps(m[blk]));
  const __m512i table = _mm512_castsi256_si512(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(vals)));
  const __m256i w16 = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + blk * 16)));
  const __m256i low4 = _mm256_set1_epi16(0x0f);
  const __m512i idx = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(w16, low4)),
                                         _mm256_srli_epi16(w16, 4), 1);
  _mm512_storeu_si512(dst, _mm512_permutexvar_epi16(idx, table));
}

// Rows [n, n + R) of block b as a [R][32] bf16 tile operand (rows at or past N zero).
template <int R>
inline void dequant_rows(bf16* buf, const uint8_t* qs, const float* d, const float* m, int64_t n,
                         int64_t N, int64_t nb, int64_t b) {
  for (int64_t r = 0; r < R; ++r) {
    if (n + r >= N) {
      _mm512_store_si512(buf + r * 32, _mm512_setzero_si512());
      continue;
    }
    const int64_t blk = (n + r) * nb + b;
    if ((b & 3) == 0) __builtin_prefetch(qs + (blk + 8) * 16);
    dequant_block(buf + r * 32, qs, d, m, blk);
  }
}

// c[t][r][j] (weight row n + r, x row 16 (t0 + t) + j) + bias -> y, transposed; cols n..n+15.
inline void store_tiles(bf16* y, int64_t ldy, const bf16* bias, float (*c)[16][16], int nt,
                        int64_t t0, int64_t n, int64_t M, int64_t N) {
  const int64_t cols = std::min<int64_t>(16, N - n);
  const __mmask16 k = cols >= 16 ? 0xffff : static_cast<__mmask16>((1u << cols) - 1);
  alignas(64) bf16 tmp[16] = {};
  if (bias) std::memcpy(tmp, bias + n, cols * sizeof(bf16));
  const __m512 bv = bias ? load16(tmp) : _mm512_setzero_ps();
  for (int t = 0; t < nt; ++t) {
    __m512i rows[16];
    for (int r = 0; r < 16; ++r) rows[r] = _mm512_load_si512(c[t][r]);
    transpose16(rows);  // rows[j] = x row j's 16 outputs
    for (int j = 0; j < 16; ++j) {
      const int64_t row = (t0 + t) * 16 + j;
      if (row >= M) break;
      const __m512 v = _mm512_add_ps(_mm512_castsi512_ps(rows[j]), bv);
      _mm256_mask_storeu_epi16(y + row * ldy + n, k, bf16_bits(v));
    }
  }
}
#endif

}  // namespace
}  // namespace inferd

using namespace inferd;

extern "C" {

// 1 when AMX is built in and the kernel granted this process the tile state, else 0.
int inferd_amx_init() {
#if defined(INFERD_HAS_AMX)
  static int ok = -1;
  if (ok < 0) {
    constexpr long kReqXcompPerm = 0x1023, kXtiledata = 18;
    ok = syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0 ? 1 : 0;
  }
  return ok;
#else
  return 0;
#endif
}

// y [M, N] bf16 (row stride ldy) = x [M, K] bf16 (row stride ldx) . W^T + bias, W as 4-bit
// blocks (qs uint8 [N, K/32, 16], d and m float32 [N, K/32]); K a multiple of 32. Call only
// after inferd_amx_init() returned 1.
void inferd_gemm_q4_amx(void* y, int64_t ldy, const void* x, int64_t ldx, const uint8_t* qs,
                        const float* d, const float* m, const void* bias, int64_t M, int64_t N,
                        int64_t K) {
#if defined(INFERD_HAS_AMX)
  if (M <= 0 || N <= 0) return;
  const int64_t nb = K / 32, mt = (M + 15) / 16;
  const bool wide = mt > 2;  // 1 weight tile x up to 4 x tiles (see the top)
  const int64_t npanels = (N + 31) / 32;
  const bf16* xb = static_cast<const bf16*>(x);
  const bf16* bb = static_cast<const bf16*>(bias);
  bf16* yb = static_cast<bf16*>(y);
  // x in pair layout: xt[t][b] = 16 rows (k pairs) x 16 lanes (x rows 16 t .. 16 t + 15)
  std::vector<__m512i> xt(mt * nb * 16);
  for (int64_t t = 0; t < mt; ++t)
    for (int64_t b = 0; b < nb; ++b) {
      __m512i rows[16];
      for (int j = 0; j < 16; ++j)
        rows[j] = 16 * t + j < M ? _mm512_loadu_si512(xb + (16 * t + j) * ldx + 32 * b)
                                 : _mm512_setzero_si512();
      transpose16(rows);
      for (int r = 0; r < 16; ++r) xt[(t * nb + b) * 16 + r] = rows[r];
    }
  const __m512i* xt0 = xt.data();
#pragma omp parallel
  {
    configure_tiles();
    alignas(64) bf16 blockbuf[2][32 * 32];
    alignas(64) float c[4][16][16];
#pragma omp for schedule(dynamic, 1)  // a descheduled thread must not hold up the other
    for (int64_t p = 0; p < npanels; ++p) {
      const int64_t n0 = p * 32;
      if (!wide) {  // 2 weight tiles (rows n..n+31) x 1-2 x tiles
        const int64_t n = n0;
        const bool two = mt == 2;
        zero_accumulators(4);
        for (int64_t b = 0; b < nb; ++b) {
          bf16* a = blockbuf[b & 1];
          dequant_rows<32>(a, qs, d, m, n, N, nb, b);
          _tile_loadd(4, a, 64);
          _tile_loadd(6, xt0 + b * 16, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_loadd(5, a + 16 * 32, 64);
          _tile_dpbf16ps(2, 5, 6);
          if (two) {
            _tile_loadd(7, xt0 + (nb + b) * 16, 64);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(3, 5, 7);
          }
        }
        // accumulator 2 h + t: weight rows n + 16 h .. + 15 against x tile t (1 stays zero
        // with one x tile)
        store_accumulators(c, 4);
        for (int h = 0; h < 2 && n + 16 * h < N; ++h)
          store_tiles(yb, ldy, bb, c + 2 * h, two ? 2 : 1, 0, n + 16 * h, M, N);
        continue;
      }
      for (int64_t n = n0; n < std::min(n0 + 32, N); n += 16)  // the panel's two halves
      for (int64_t t0 = 0; t0 < mt; t0 += 4) {  // 1 weight tile (rows n..n+15) x 1-4 x tiles
        const int nt = static_cast<int>(std::min<int64_t>(4, mt - t0));
        const __m512i* xg = xt0 + t0 * nb * 16;
        zero_accumulators(nt);
        for (int64_t b = 0; b < nb; ++b) {
          bf16* a = blockbuf[b & 1];
          dequant_rows<16>(a, qs, d, m, n, N, nb, b);
          _tile_loadd(4, a, 64);
          _tile_loadd(5, xg + b * 16, 64);
          _tile_dpbf16ps(0, 4, 5);
          if (nt > 1) {
            _tile_loadd(6, xg + (nb + b) * 16, 64);
            _tile_dpbf16ps(1, 4, 6);
          }
          if (nt > 2) {
            _tile_loadd(7, xg + (2 * nb + b) * 16, 64);
            _tile_dpbf16ps(2, 4, 7);
          }
          if (nt > 3) {
            _tile_loadd(5, xg + (3 * nb + b) * 16, 64);
            _tile_dpbf16ps(3, 4, 5);
          }
        }
        store_accumulators(c, nt);
        store_tiles(yb, ldy, bb, c, nt, t0, n, M, N);
      }
    }
    _tile_release();
  }
#else
  (void)y; (void)ldy; (void)x; (void)ldx; (void)qs; (void)d; (void)m; (void)bias; (void)M;
  (void)N; (void)K;
#endif
}

}  // extern "C"
