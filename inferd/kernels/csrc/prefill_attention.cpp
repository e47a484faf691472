// Causal attention of prefill chunks over the paged KV cache (bf16, AVX512-BF16), for chunks
// with or without cached context (prefix-cache hits, chunked prefill).
//
// Why hand-written: torch's CPU flash attention in bf16 runs at ~35-105 GFLOP/s here (Zen 4,
// SmolLM2's 9 query heads of 64 over 3 KV heads: 16 x 128 tokens or 1 x 2048), and chunks
// with context first gathered their K/V out of the cache into a padded copy. Here a unit of
// work is (sequence, KV head, 16 query positions) with all of that KV head's query heads: R =
// 16 x groups rows share every K/V block read. Per step of 64 keys (4 groups of 16, each in
// one cache block):
//   K^T in vdpbf16ps's pair layout (a transpose of 16 keys x D per group), V with key pairs
//   interleaved; per row: scores with 16 keys in the lanes of each of 4 accumulators, D / 2
//   dot products with the row's pairs broadcast; an online softmax (running max, sum, fp32);
//   p rounded to bf16 and out += p . V as 32 key pairs x D / 16 dot products, 4 rows' fp32
//   outputs in registers. Measured against torch's bf16 SDPA on the same shapes (Zen 4): 2.2x
//   at 16 x 128 tokens, 1.5x at 8 x 256, 1.1x at 1 x 2048 (before the two changes below).
// The products live in templates on the group and vector counts (qk_scores, pv_accumulate):
// with a runtime count, GCC kept the 16 accumulators in memory, a store and a load around
// every product (1.55-1.8x slower, same bits). And a unit of work is a span of up to 256
// positions whose keys are packed once for all its tiles, not once per tile.
// The output is out / l rounded once. Rows past a sequence's causal limit are masked per key.
#include "api.h"
#include "common.h"

namespace inferd {
namespace {

#if defined(__AVX512BF16__)
constexpr int64_t kQTile = 16;  // query positions per tile (32 measured no better)
constexpr int64_t kSpan = 256;  // query positions per unit of work (tiles sharing one K/V pack)
constexpr int kMaxD = 256;      // head_dim limit (multiple of 32)
constexpr int kRows = 4;        // rows per pass: 4 x 4 output accumulators + 4 V vectors
constexpr int kSub = 4;         // 16-key groups per softmax step (64 keys)

struct Prefill {
  const bf16* q;
  int64_t q_stride;  // elements between tokens
  bf16* out;
  int64_t out_stride;
  const bf16* kv;  // [2, num_blocks, block_size, kv_heads, D]
  int64_t num_blocks, block_size, heads, kv_heads, D, table_stride, window;
  const int32_t* tables;
  float scale;
};

// Where key `key` of KV head g lies in the K half of the cache (elements); its V is
// kv_v_offset(a) further on.
inline int64_t kv_offset(const Prefill& a, const int32_t* table, int64_t key, int64_t g) {
  return (static_cast<int64_t>(table[key / a.block_size]) * a.block_size + key % a.block_size) *
             a.kv_heads * a.D + g * a.D;
}
inline int64_t kv_v_offset(const Prefill& a) {
  return a.num_blocks * a.block_size * a.kv_heads * a.D;
}

// Keys 0 .. n16 - 1 of one cache block (rows `row` elements apart, one KV head of D) as the
// products' operands, zero past n16: K^T pairs kt[dp][j] = (k[j][2dp], k[j][2dp + 1]) (a 16 x 16
// transpose of 32-bit pairs per 32 dims) and value pairs vp[kp][d] = (v[2kp][d], v[2kp + 1][d]).
// Both are also AMX's B-tile layouts.
inline void pack_kv_group(uint32_t (*kt)[16], uint32_t* vp, int64_t vstride, const bf16* kbase,
                          const bf16* vbase, int64_t row, int64_t D, int64_t n16) {
  for (int64_t c = 0; c < D / 2; c += 16) {
    __m512i rows[16];
    for (int j = 0; j < 16; ++j)
      rows[j] = j < n16 ? _mm512_loadu_si512(kbase + j * row + 2 * c) : _mm512_setzero_si512();
    transpose16(rows);
    for (int i = 0; i < 16; ++i) _mm512_store_si512(kt[c + i], rows[i]);
  }
  for (int kp = 0; kp < 8; ++kp) {
    const int j0 = 2 * kp, j1 = 2 * kp + 1;
    for (int64_t d = 0; d < D; d += 16) {
      const __m512i a0 = j0 < n16 ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(vbase + j0 * row + d))) : _mm512_setzero_si512();
      const __m512i a1 = j1 < n16 ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(vbase + j1 * row + d))) : _mm512_setzero_si512();
      _mm512_store_si512(vp + kp * vstride + d, _mm512_or_si512(a0, _mm512_slli_epi32(a1, 16)));
    }
  }
}

// Keys k0 .. k_end (k0 a multiple of 16) of KV head g, packed once for every tile of a span:
// group i (keys k0 + 16i ..) as K^T pairs at kt + i * D * 8 ([D / 2][16]) and value pairs at
// vp + i * 8 * D ([8][D]); zero past k_end.
inline void pack_kv_span(const Prefill& a, const int32_t* table, int64_t g, int64_t k0,
                         int64_t k_end, uint32_t* kt, uint32_t* vp) {
  const int64_t row = a.kv_heads * a.D;
  for (int64_t i = 0, key = k0; key <= k_end; ++i, key += 16) {
    const int64_t at = kv_offset(a, table, key, g);
    pack_kv_group(reinterpret_cast<uint32_t (*)[16]>(kt + i * a.D * 8), vp + i * 8 * a.D, a.D,
                  a.kv + at, a.kv + kv_v_offset(a) + at, row, a.D,
                  std::min<int64_t>(16, k_end + 1 - key));
  }
}

// Keys kb .. kb + nk - 1 (nk <= 16 kSub, groups of 16 inside one cache block each) of KV head g.
inline void pack_kv_step(const Prefill& a, const int32_t* table, int64_t g, int64_t kb, int64_t nk,
                         uint32_t (*kt)[kMaxD / 2][16], uint32_t (*vp)[kMaxD]) {
  const int64_t row = a.kv_heads * a.D;
  for (int64_t sb = 0; 16 * sb < nk; ++sb) {
    const int64_t at = kv_offset(a, table, kb + 16 * sb, g);
    pack_kv_group(kt[sb], vp[8 * sb], kMaxD, a.kv + at, a.kv + kv_v_offset(a) + at, row, a.D,
                  std::min<int64_t>(16, nk - 16 * sb));
  }
}

// Scores of kRows query rows against NS 16-key groups: sc[i][sb] = q_i . k (pair layout),
// with NS a constant so that the loop keeps its accumulators in registers.
template <int NS>
inline void qk_scores(__m512 (&sc)[kRows][kSub], const uint32_t* const (&qr)[kRows],
                      const uint32_t* kts, int64_t DP) {
  __m512 acc[kRows][NS];  // local, not sc itself: GCC keeps an array it can index in memory
#pragma GCC unroll 4
  for (int i = 0; i < kRows; ++i)
#pragma GCC unroll 4
    for (int sb = 0; sb < NS; ++sb) acc[i][sb] = _mm512_setzero_ps();
  for (int64_t dp = 0; dp < DP; ++dp) {
    __m512bh kv[NS];
#pragma GCC unroll 4
    for (int sb = 0; sb < NS; ++sb)
      kv[sb] = reinterpret_cast<__m512bh>(_mm512_load_si512(kts + (sb * DP + dp) * 16));
#pragma GCC unroll 4
    for (int i = 0; i < kRows; ++i) {
      const __m512bh qv = reinterpret_cast<__m512bh>(_mm512_set1_epi32(qr[i][dp]));
#pragma GCC unroll 4
      for (int sb = 0; sb < NS; ++sb) acc[i][sb] = _mm512_dpbf16_ps(acc[i][sb], kv[sb], qv);
    }
  }
  for (int i = 0; i < kRows; ++i)
    for (int sb = 0; sb < NS; ++sb) sc[i][sb] = acc[i][sb];
}

// o[i][0 .. 16 NC) = o[i] * av[i] + sum over key pairs kp < nkp of p_i[kp] . vp[kp], for rows
// i < rg (o rows `ostride` floats apart, vp rows `vstride` words apart), NC constant as above.
template <int NC>
inline void pv_accumulate(float* o, int64_t ostride, int rg, const __m512 (&av)[kRows],
                          const uint32_t (&pp)[kRows][8 * kSub], const uint32_t* vp,
                          int64_t vstride, int nkp) {
  __m512 acc[kRows][NC];
  for (int i = 0; i < kRows; ++i)
    for (int j = 0; j < NC; ++j)
      acc[i][j] = i < rg ? _mm512_mul_ps(_mm512_load_ps(o + i * ostride + 16 * j), av[i])
                         : _mm512_setzero_ps();
  for (int kp = 0; kp < nkp; ++kp) {
    __m512bh vv[NC];
    for (int j = 0; j < NC; ++j) {
      __m512i v = _mm512_load_si512(vp + kp * vstride + 16 * j);
      asm("" : "+v"(v));  // one load per vector: GCC would reload it for every row
      vv[j] = reinterpret_cast<__m512bh>(v);
    }
    for (int i = 0; i < kRows; ++i) {
      const __m512bh pv = reinterpret_cast<__m512bh>(_mm512_set1_epi32(pp[i][kp]));
      for (int j = 0; j < NC; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], vv[j], pv);
    }
  }
  for (int i = 0; i < rg; ++i)
    for (int j = 0; j < NC; ++j) _mm512_store_ps(o + i * ostride + 16 * j, acc[i][j]);
}

// One tile: rows p0 .. p0 + np - 1 of the sequence whose rows start at `start`, at positions
// ctx + p0 .., KV head g, against its span's keys packed from k0 (pack_kv_span).
void prefill_tile(const Prefill& a, int64_t start, int64_t ctx, int64_t p0, int64_t np,
                  int64_t g, const uint32_t* kt, const uint32_t* vp, int64_t k0) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t D = a.D, G = a.heads / a.kv_heads, R = np * G, DP = D / 2, DC = D / 16;
  // rows r = p * G + h: query position p0 + p, head g * G + h
  std::vector<__m512> o_buf(R * D / 16);  // fp32 output rows [R, D], 64-byte aligned
  float* o = reinterpret_cast<float*>(o_buf.data());
  float mx[kQTile * 8], sum[kQTile * 8];  // G <= 8
  for (int64_t r = 0; r < R; ++r) {
    mx[r] = kNegInf;
    sum[r] = 0.f;
  }
  const int64_t q_lo = ctx + p0, q_hi = ctx + p0 + np - 1;  // positions of the tile's queries
  const int64_t k_lo = a.window > 0 ? std::max<int64_t>(0, q_lo - a.window + 1) : 0;
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t kb = k_lo / 16 * 16; kb <= q_hi; kb += 16 * kSub) {
    // keys kb .. kb + 16 kSub - 1 in kSub groups of 16 (each inside one cache block); past
    // q_hi the span holds later positions' keys (zeros past its end), which the masks drop
    const int64_t nk = std::min<int64_t>(16 * kSub, q_hi + 1 - kb);
    const int ns = static_cast<int>((nk + 15) / 16);
    const int64_t gi = (kb - k0) / 16;  // the step's first group in the packed span
    const uint32_t* kts = kt + gi * D * 8;
    const uint32_t* vps = vp + gi * 8 * D;
    for (int64_t r0 = 0; r0 < R; r0 += kRows) {  // kRows rows at a time: independent chains
      const int rg = static_cast<int>(std::min<int64_t>(kRows, R - r0));
      const uint32_t* qr[kRows];
      __m512 sc[kRows][kSub];
      for (int i = 0; i < kRows; ++i) {
        const int64_t r = r0 + std::min(i, rg - 1), p = r / G, h = r % G;
        qr[i] = reinterpret_cast<const uint32_t*>(a.q + (start + p0 + p) * a.q_stride +
                                                  (g * G + h) * D);
        for (int sb = 0; sb < kSub; ++sb) sc[i][sb] = _mm512_setzero_ps();
      }
      switch (ns) {  // constant group counts keep the 4 x ns accumulators in registers
        case 1: qk_scores<1>(sc, qr, kts, DP); break;
        case 2: qk_scores<2>(sc, qr, kts, DP); break;
        case 3: qk_scores<3>(sc, qr, kts, DP); break;
        default: qk_scores<4>(sc, qr, kts, DP); break;
      }
      alignas(64) uint32_t pp[kRows][8 * kSub];  // each row's p as bf16 key pairs
      __m512 av[kRows];
      for (int i = 0; i < kRows; ++i) {
        av[i] = _mm512_set1_ps(1.f);
        std::memset(pp[i], 0, sizeof(pp[i]));
        if (i >= rg) continue;
        const int64_t r = r0 + i, qpos = ctx + p0 + r / G;
        __mmask16 keep[kSub];
        __m512 sv[kSub];
        __m512 m4 = _mm512_set1_ps(kNegInf);
        bool any = false;
        for (int sb = 0; sb < kSub; ++sb) {
          // keys kb + 16 sb + j count when <= qpos (so inside nk) and inside the window
          const __m512i kpos = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(kb + 16 * sb)), lane);
          keep[sb] = sb < ns ? _mm512_cmple_epi32_mask(kpos, _mm512_set1_epi32(static_cast<int32_t>(qpos)))
                             : 0;
          if (a.window > 0)
            keep[sb] &= _mm512_cmpgt_epi32_mask(kpos, _mm512_set1_epi32(static_cast<int32_t>(qpos - a.window)));
          any |= keep[sb] != 0;
          sv[sb] = _mm512_mask_mul_ps(_mm512_set1_ps(kNegInf), keep[sb], sc[i][sb],
                                      _mm512_set1_ps(a.scale));
          m4 = _mm512_max_ps(m4, sv[sb]);
        }
        if (!any) continue;
        const float m_new = std::max(mx[r], _mm512_reduce_max_ps(m4));
        const float alpha = mx[r] == kNegInf ? 0.f : std::exp(mx[r] - m_new);
        __m512 esum = _mm512_setzero_ps();
        for (int sb = 0; sb < ns; ++sb) {
          const __m512 e = _mm512_maskz_mov_ps(keep[sb], exp512(_mm512_sub_ps(sv[sb], _mm512_set1_ps(m_new))));
          esum = _mm512_add_ps(esum, e);
          _mm256_store_si256(reinterpret_cast<__m256i*>(pp[i] + 8 * sb), bf16_bits(e));
        }
        mx[r] = m_new;
        sum[r] = sum[r] * alpha + _mm512_reduce_add_ps(esum);
        av[i] = _mm512_set1_ps(alpha);
      }
      const int nkp = 8 * ns;
      for (int64_t c = 0; c < DC; c += 4) {  // 4 x 16 output dims of every row in registers
        float* oc = o + r0 * D + 16 * c;
        switch (std::min<int64_t>(4, DC - c)) {
          case 1: pv_accumulate<1>(oc, D, rg, av, pp, vps + 16 * c, D, nkp); break;
          case 2: pv_accumulate<2>(oc, D, rg, av, pp, vps + 16 * c, D, nkp); break;
          case 3: pv_accumulate<3>(oc, D, rg, av, pp, vps + 16 * c, D, nkp); break;
          default: pv_accumulate<4>(oc, D, rg, av, pp, vps + 16 * c, D, nkp); break;
        }
      }
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    const int64_t p = r / G, h = r % G;
    bf16* dst = a.out + (start + p0 + p) * a.out_stride + (g * G + h) * D;
    const __m512 inv = _mm512_set1_ps(sum[r] > 0.f ? 1.f / sum[r] : 0.f);
    for (int64_t d = 0; d < D; d += 16) store16(dst + d, _mm512_mul_ps(_mm512_load_ps(o + r * D + d), inv));
  }
}
#endif

#if defined(INFERD_HAS_AMX)
// The same unit of work on AMX (Sapphire Rapids and later), where torch's SDPA beat the
// AVX512-BF16 tile above (~100 against ~180 ms of a 2048-token SmolLM2 step). The K^T pairs and
// interleaved V built above are exactly the tiles' B layouts, so per 64-key step and 16 rows:
//   S [16 x 64] = Q [16 x D] . K^T       (D / 32 x 4 tdpbf16ps into tiles 0-3, stored)
//   softmax on S in fp32 (AVX-512, as the tile above: running max and sum, p rounded to bf16)
//   O_step [16 x D] = P [16 x 64] . V    (2 x D / 16 tdpbf16ps, 4 output tiles at a time)
//   o = o * alpha + O_step               (fp32, AVX-512)
// Tiles: 0-3 accumulators, 4 the A operand (Q or P), 5 the B operand (K^T or V).
constexpr int64_t kQTileAmx = 256;  // query positions per unit: more rows share each K/V repack

#define INFERD_TILE_CASE4(stmt) \
  stmt(0);                      \
  if (n > 1) stmt(1);           \
  if (n > 2) stmt(2);           \
  if (n > 3) stmt(3)

void prefill_tile_amx(const Prefill& a, const int32_t* table, int64_t start, int64_t ctx,
                      int64_t p0, int64_t np, int64_t g) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t D = a.D, G = a.heads / a.kv_heads, R = np * G, DC = D / 16;
  const int64_t Rp = (R + 15) / 16 * 16;  // rows padded to whole tiles (zero queries)
  std::vector<bf16> qbuf(Rp * D);          // the unit's query rows, contiguous for tile loads
  std::vector<__m512> o_buf(Rp * D / 16);  // fp32 output rows [Rp, D]
  float* o = reinterpret_cast<float*>(o_buf.data());
  std::vector<float> mx(Rp, kNegInf), sum(Rp, 0.f);
  alignas(64) uint32_t kt[kSub][kMaxD / 2][16];
  alignas(64) uint32_t vp[8 * kSub][kMaxD];
  alignas(64) float sbuf[16][16 * kSub];    // one row tile's scores
  alignas(64) uint32_t pbuf[16][8 * kSub];  // its p as bf16 key pairs
  alignas(64) float ostep[16][kMaxD];
  float alpha[16];
  for (int64_t r = 0; r < Rp; ++r) {
    bf16* dst = qbuf.data() + r * D;
    if (r < R) {
      const int64_t p = r / G, h = r % G;
      std::memcpy(dst, a.q + (start + p0 + p) * a.q_stride + (g * G + h) * D, D * sizeof(bf16));
    } else {
      std::memset(dst, 0, D * sizeof(bf16));
    }
  }
  const int64_t q_lo = ctx + p0, q_hi = ctx + p0 + np - 1;
  const int64_t k_lo = a.window > 0 ? std::max<int64_t>(0, q_lo - a.window + 1) : 0;
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t kb = k_lo / 16 * 16; kb <= q_hi; kb += 16 * kSub) {
    const int64_t nk = std::min<int64_t>(16 * kSub, q_hi + 1 - kb);
    const int ns = static_cast<int>((nk + 15) / 16);
    const int nkc = (ns + 1) / 2;  // 32-key chunks of P . V
    pack_kv_step(a, table, g, kb, nk, kt, vp);
    if (ns % 2)  // the odd group's partner in the last 32-key chunk: zero values (p is 0 too)
      for (int kp = 8 * ns; kp < 8 * ns + 8; ++kp) std::memset(vp[kp], 0, D * sizeof(uint32_t));
    for (int64_t r0 = 0; r0 < Rp; r0 += 16) {
      // a tile of rows whose last position comes before these keys: all masked, nothing to add
      if (ctx + p0 + std::min(r0 + 15, R - 1) / G < kb) continue;
      {  // scores
        const int n = ns;
#define INFERD_ZERO(t) _tile_zero(t)
        INFERD_TILE_CASE4(INFERD_ZERO);
        for (int64_t c = 0; c < D / 32; ++c) {
          _tile_loadd(4, qbuf.data() + r0 * D + 32 * c, D * sizeof(bf16));
#define INFERD_QK(t)                                   \
  do {                                                 \
    _tile_loadd(5, kt[t][16 * c], 64);                 \
    _tile_dpbf16ps(t, 4, 5);                           \
  } while (0)
          INFERD_TILE_CASE4(INFERD_QK);
#undef INFERD_QK
        }
#define INFERD_STORE_S(t) _tile_stored(t, &sbuf[0][16 * t], sizeof(sbuf[0]))
        INFERD_TILE_CASE4(INFERD_STORE_S);
#undef INFERD_STORE_S
      }
      // Softmax of the 16 rows (the tile above's arithmetic). Scalar work per row, a
      // horizontal max and std::exp of the rescale factor, was most of the kernel's time: the
      // rows' maxima, rescale factors and sums go through one vector each instead.
      const __m512 ninf = _mm512_set1_ps(kNegInf);
      // every key of this step at or before every row's position: no per-key mask
      const bool full = a.window <= 0 && kb + 16 * ns - 1 <= ctx + p0 + r0 / G;
      alignas(64) float rmax[16], rnew[16], esums[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t r = r0 + i;
        __m512 m4 = ninf;
        if (r < R) {
          const int64_t qpos = ctx + p0 + r / G;
          for (int sb = 0; sb < ns; ++sb) {
            __mmask16 keep = 0xffff;
            if (!full) {
              const __m512i kpos = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(kb + 16 * sb)), lane);
              keep = _mm512_cmple_epi32_mask(kpos, _mm512_set1_epi32(static_cast<int32_t>(qpos)));
              if (a.window > 0)
                keep &= _mm512_cmpgt_epi32_mask(kpos, _mm512_set1_epi32(static_cast<int32_t>(qpos - a.window)));
            }
            const __m512 sv = _mm512_mask_mul_ps(ninf, keep, _mm512_load_ps(&sbuf[i][16 * sb]),
                                                 _mm512_set1_ps(a.scale));
            _mm512_store_ps(&sbuf[i][16 * sb], sv);
            m4 = _mm512_max_ps(m4, sv);
          }
        }
        rmax[i] = _mm512_reduce_max_ps(m4);
      }
      const __m512 m_old = _mm512_loadu_ps(mx.data() + r0), rm = _mm512_load_ps(rmax);
      const __m512 m_new = _mm512_max_ps(m_old, rm);
      const __mmask16 had = _mm512_cmp_ps_mask(m_old, ninf, _CMP_NEQ_OQ);  // keys before
      const __mmask16 has = _mm512_cmp_ps_mask(rm, ninf, _CMP_NEQ_OQ);     // keys in this step
      // alpha = exp(m_old - m_new), 0 for a row's first keys, 1 for rows without keys here
      const __m512 al = _mm512_mask_mov_ps(_mm512_set1_ps(1.f), has,
                                           _mm512_maskz_mov_ps(had, exp512(_mm512_sub_ps(m_old, m_new))));
      _mm512_store_ps(alpha, al);
      _mm512_store_ps(rnew, m_new);
      _mm512_storeu_ps(mx.data() + r0, _mm512_mask_mov_ps(m_old, has, m_new));
      for (int i = 0; i < 16; ++i) {
        std::memset(pbuf[i], 0, sizeof(pbuf[i]));
        esums[i] = 0.f;
        if (!((has >> i) & 1)) continue;
        const __m512 mv = _mm512_set1_ps(rnew[i]);
        __m512 esum = _mm512_setzero_ps();
        for (int sb = 0; sb < ns; ++sb) {
          const __m512 sv = _mm512_load_ps(&sbuf[i][16 * sb]);
          const __m512 e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(sv, ninf, _CMP_NEQ_OQ),
                                               exp512(_mm512_sub_ps(sv, mv)));
          esum = _mm512_add_ps(esum, e);
          _mm256_store_si256(reinterpret_cast<__m256i*>(pbuf[i] + 8 * sb), bf16_bits(e));
        }
        esums[i] = _mm512_reduce_add_ps(esum);
      }
      _mm512_storeu_ps(sum.data() + r0, _mm512_fmadd_ps(_mm512_loadu_ps(sum.data() + r0), al,
                                                       _mm512_load_ps(esums)));
      for (int64_t j0 = 0; j0 < DC; j0 += 4) {  // out += p . V, 4 x 16 dims per pass
        const int n = static_cast<int>(std::min<int64_t>(4, DC - j0));
        INFERD_TILE_CASE4(INFERD_ZERO);
        for (int kc2 = 0; kc2 < nkc; ++kc2) {
          _tile_loadd(4, pbuf[0] + 16 * kc2, sizeof(pbuf[0]));
#define INFERD_PV(t)                                                   \
  do {                                                                 \
    _tile_loadd(5, vp[16 * kc2] + 16 * (j0 + t), sizeof(vp[0]));       \
    _tile_dpbf16ps(t, 4, 5);                                           \
  } while (0)
          INFERD_TILE_CASE4(INFERD_PV);
#undef INFERD_PV
        }
#define INFERD_STORE_O(t) _tile_stored(t, &ostep[0][16 * (j0 + t)], sizeof(ostep[0]))
        INFERD_TILE_CASE4(INFERD_STORE_O);
#undef INFERD_STORE_O
      }
      for (int i = 0; i < 16 && r0 + i < R; ++i) {
        float* orow = o + (r0 + i) * D;
        const __m512 av = _mm512_set1_ps(alpha[i]);
        for (int64_t d = 0; d < D; d += 16)
          _mm512_store_ps(orow + d, _mm512_fmadd_ps(_mm512_load_ps(orow + d), av,
                                                    _mm512_load_ps(&ostep[i][d])));
      }
#undef INFERD_ZERO
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    const int64_t p = r / G, h = r % G;
    bf16* dst = a.out + (start + p0 + p) * a.out_stride + (g * G + h) * D;
    const __m512 inv = _mm512_set1_ps(sum[r] > 0.f ? 1.f / sum[r] : 0.f);
    for (int64_t d = 0; d < D; d += 16) store16(dst + d, _mm512_mul_ps(_mm512_load_ps(o + r * D + d), inv));
  }
}
#undef INFERD_TILE_CASE4
#endif  // INFERD_HAS_AMX

}  // namespace
}  // namespace inferd

using namespace inferd;

extern "C" {

// Prefill rows of sequences [first, num_seqs): sequence i's queries are rows
// [query_start[i], query_start[i + 1]) of q (bf16 [T, heads, D], token stride q_stride) at
// positions seq_lens[i] - (its row count) .. seq_lens[i] - 1, attending causally (and within
// `window` when > 0) to positions [0, seq_lens[i]) of its blocks in kv_cache (bf16 [2,
// num_blocks, block_size, kv_heads, D], already holding these rows' K/V). out bf16 [T, heads,
// D] (token stride out_stride). Needs block_size % 16 == 0, D % 32 == 0, D <= 256, heads /
// kv_heads <= 8; the caller checked every index (cpu.py).
void inferd_prefill_attention(void* out, int64_t out_stride, const void* q, int64_t q_stride,
                              const void* kv_cache, int64_t num_blocks, const int32_t* block_tables,
                              int64_t table_stride, const int32_t* seq_lens,
                              const int32_t* query_start, int64_t first, int64_t num_seqs,
                              int64_t heads, int64_t kv_heads, int64_t head_dim,
                              int64_t block_size, float scale, int64_t window, int64_t use_amx) {
#if defined(__AVX512BF16__)
#if defined(INFERD_HAS_AMX)
  const bool amx = use_amx && inferd_amx_init() == 1;
  // AVX512-BF16: a unit of work is a span of kSpan positions, whose keys are packed once for
  // all of its 16-position tiles (AMX tiles are long enough to pack per tile)
  const int64_t span = amx ? kQTileAmx : kSpan;
#else
  (void)use_amx;
  const int64_t span = kSpan;
#endif
  const Prefill a{static_cast<const bf16*>(q), q_stride, static_cast<bf16*>(out), out_stride,
                  static_cast<const bf16*>(kv_cache), num_blocks, block_size, heads, kv_heads,
                  head_dim, table_stride, window, block_tables, scale};
  struct Item { int64_t seq, p0, g; };
  std::vector<Item> items;
  for (int64_t i = first; i < num_seqs; ++i) {
    const int64_t lq = query_start[i + 1] - query_start[i];
    // the longest spans (latest positions) first: dynamic scheduling then balances the tail
    for (int64_t p0 = (lq - 1) / span * span; p0 >= 0; p0 -= span)
      for (int64_t g = 0; g < kv_heads; ++g) items.push_back({i, p0, g});
  }
#pragma omp parallel
  {
#if defined(INFERD_HAS_AMX)
    if (amx) configure_tiles();
#endif
    std::vector<__m512i> kbuf, vbuf;  // this thread's packed span (64-byte aligned)
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < static_cast<int64_t>(items.size()); ++it) {
      const Item& w = items[it];
      const int64_t start = query_start[w.seq], lq = query_start[w.seq + 1] - start;
      const int64_t ctx = seq_lens[w.seq] - lq, np = std::min(span, lq - w.p0);
      const int32_t* table = block_tables + w.seq * table_stride;
#if defined(INFERD_HAS_AMX)
      if (amx) {
        prefill_tile_amx(a, table, start, ctx, w.p0, np, w.g);
        continue;
      }
#endif
      const int64_t k_lo = window > 0 ? std::max<int64_t>(0, ctx + w.p0 - window + 1) : 0;
      const int64_t k0 = k_lo / 16 * 16, k_end = ctx + w.p0 + np - 1;
      const int64_t groups = (k_end - k0) / 16 + 1, words = groups * head_dim * 8;  // per K or V
      if (static_cast<int64_t>(kbuf.size()) < words / 16) {
        kbuf.resize(words / 16);
        vbuf.resize(words / 16);
      }
      uint32_t* kt = reinterpret_cast<uint32_t*>(kbuf.data());
      uint32_t* vp = reinterpret_cast<uint32_t*>(vbuf.data());
      pack_kv_span(a, table, w.g, k0, k_end, kt, vp);
      for (int64_t t0 = w.p0; t0 < w.p0 + np; t0 += kQTile)
        prefill_tile(a, start, ctx, t0, std::min(kQTile, w.p0 + np - t0), w.g, kt, vp, k0);
    }
#if defined(INFERD_HAS_AMX)
    if (amx) _tile_release();
#endif
  }
#else
  (void)out; (void)out_stride; (void)q; (void)q_stride; (void)kv_cache; (void)num_blocks;
  (void)block_tables; (void)table_stride; (void)seq_lens; (void)query_start; (void)first;
  (void)num_seqs; (void)heads; (void)kv_heads; (void)head_dim; (void)block_size; (void)scale;
  (void)window; (void)use_amx;
#endif
}

}  // extern "C"
