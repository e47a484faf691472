// Matmuls of decode batches (a few to a few dozen rows) against a GGUF's 4-bit blocks, on AMX.
//
// Why: from 4 rows up, the skinny kernels (gemv.cpp) become compute-bound, and oneDNN's bf16
// kernels are bound by reading bf16 weights (~11-18 GB/s here). Dequantizing the 4-bit blocks
// into bf16 tiles on the fly reads 2.8x fewer bytes, and AMX makes the arithmetic nearly free.
//
// Shape of the computation, per thread (a range of 32-row weight panels):
//   C^T [16 n x 16 m] += A [16 n x 32 k] . B [32 k x 16 m]   (tdpbf16ps, fp32 accumulation)
// A is a tile of a row-major panel of 32 weight rows, dequantized once per call: each 32-value
// block goes through a 16-entry table (bf16(d q + m) for q = 0..15, computed as the float
// dequantizer computes it, so these are the very weights the bf16 path loads). B is x in
// AMX's pair layout (row r of block b holds (x[m][32b + 2r], x[m][32b + 2r + 1]) for 16 m),
// transposed once per call and shared by all threads. C^T tiles transpose back on the way
// out. Four accumulators: 2 weight tiles x 2 x tiles. Weights are the big operand, so they
// are the one never transposed.
#include "api.h"
#include "common.h"

#include <memory>

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

// Rows [n, n + 32) of the weights, all K, as bf16, row-major: panel[r][k] (rows past N are
// zero). Blocks are read and rows written in order, one stream each.
void build_panel(bf16* panel, const uint8_t* qs, const float* d, const float* m, int64_t n,
                 int64_t N, int64_t nb) {
  if (n + 32 < N) {  // the next panel's blocks and scales, while this one is built
    const int64_t rows = std::min<int64_t>(32, N - n - 32);
    const char* q = reinterpret_cast<const char*>(qs + (n + 32) * nb * 16);
    for (int64_t off = 0; off < rows * nb * 16; off += 64) __builtin_prefetch(q + off);
    const char* dp = reinterpret_cast<const char*>(d + (n + 32) * nb);
    const char* mp = reinterpret_cast<const char*>(m + (n + 32) * nb);
    for (int64_t off = 0; off < rows * nb * 4; off += 64) {
      __builtin_prefetch(dp + off);
      __builtin_prefetch(mp + off);
    }
  }
  for (int64_t r = 0; r < 32; ++r) {
    const int64_t row = n + r;
    bf16* dst = panel + r * nb * 32;
    if (row >= N) {
      std::memset(dst, 0, nb * 32 * sizeof(bf16));
      continue;
    }
    for (int64_t b = 0; b < nb; ++b) dequant_block(dst + b * 32, qs, d, m, row * nb + b);
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
  const int64_t nb = K / 32, mt = (M + 15) / 16, npanels = (N + 31) / 32;
  // Up to 32 rows of x, one pass over K: each 32 x 32 weight block is dequantized right before
  // its tile loads (from L1), 1.2-1.5x faster here than building the whole 32-row panel first
  // (which spills L1 for the larger K). More rows reuse a panel across passes.
  const bool direct = mt <= 2;
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
#pragma omp parallel
  {
    configure_tiles();
    // uninitialised: build_panel writes every row before a tile reads it (a value-initialised
    // vector was a scalar fill of 32 K elements per thread and call)
    std::unique_ptr<bf16[]> panel(direct ? nullptr : new bf16[32 * K]);
    alignas(64) bf16 blockbuf[2][32 * 32];
    alignas(64) float c[4][16][16];
#pragma omp for schedule(dynamic, 1)  // a descheduled thread must not hold up the other
    for (int64_t p = 0; p < npanels; ++p) {
      const int64_t n = p * 32, rows_here = std::min<int64_t>(32, N - n);
      if (!direct) build_panel(panel.get(), qs, d, m, n, N, nb);
      __m512 bias_v[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
      if (bb)
        for (int h = 0; h < 2; ++h) {
          alignas(64) bf16 tmp[16] = {};
          const int64_t col = n + 16 * h, cnt = std::max<int64_t>(0, std::min<int64_t>(16, N - col));
          std::memcpy(tmp, bb + std::min(col, N), cnt * sizeof(bf16));
          bias_v[h] = load16(tmp);
        }
      for (int64_t t0 = 0; t0 < mt; t0 += 2) {
        const bool two = t0 + 1 < mt;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t b = 0; b < nb; ++b) {
          const bf16* a = panel.get() + b * 32;
          int64_t lda = K;
          if (direct) {  // this block of the 32 rows, dequantized into a 2 KB buffer in L1
            bf16* buf = blockbuf[b & 1];
            for (int64_t r = 0; r < 32; ++r) {
              if (r >= rows_here) {
                _mm512_store_si512(buf + r * 32, _mm512_setzero_si512());
                continue;
              }
              const int64_t blk = (n + r) * nb + b;
              if ((b & 3) == 0) __builtin_prefetch(qs + (blk + 8) * 16);
              dequant_block(buf + r * 32, qs, d, m, blk);
            }
            a = buf;
            lda = 32;
          }
          _tile_loadd(4, a, lda * 2);
          _tile_loadd(6, xt.data() + (t0 * nb + b) * 16, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_loadd(5, a + 16 * lda, lda * 2);
          _tile_dpbf16ps(1, 5, 6);
          if (two) {
            _tile_loadd(7, xt.data() + ((t0 + 1) * nb + b) * 16, 64);
            _tile_dpbf16ps(2, 4, 7);
            _tile_dpbf16ps(3, 5, 7);
          }
        }
        _tile_stored(0, c[0], 64);
        _tile_stored(1, c[1], 64);
        if (two) {
          _tile_stored(2, c[2], 64);
          _tile_stored(3, c[3], 64);
        }
        // c[2 dt + h][r][j]: weight row n + 16 h + r, x row 16 (t0 + dt) + j -> transposed
        for (int dt = 0; dt < (two ? 2 : 1); ++dt)
          for (int h = 0; h < 2; ++h) {
            const int64_t col = n + 16 * h;
            if (col >= N) break;
            const __mmask16 k = N - col >= 16 ? 0xffff : static_cast<__mmask16>((1u << (N - col)) - 1);
            __m512i rows[16];
            for (int r = 0; r < 16; ++r) rows[r] = _mm512_load_si512(c[2 * dt + h][r]);
            transpose16(rows);  // rows[j] = x row j's 16 outputs
            for (int j = 0; j < 16; ++j) {
              const int64_t row = (t0 + dt) * 16 + j;
              if (row >= M) break;
              const __m512 v = _mm512_add_ps(_mm512_castsi512_ps(rows[j]), bias_v[h]);
              _mm256_mask_storeu_epi16(yb + row * ldy + col, k, bf16_bits(v));
            }
          }
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
