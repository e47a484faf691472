// Paged attention for decodes and the KV-cache write (see inferd/attention/backends/cpu.py).
//
// Why hand-written: torch has no paged attention on CPU. Its decode path had to gather every
// sequence's K/V into a padded copy and run a masked SDPA whose CPU kernel is tuned for long
// queries, not for one query per sequence; at 64 sequences that was half of a step.
#include "api.h"
#include "common.h"

#include <type_traits>

namespace inferd {
namespace {

struct alignas(64) Line {  // scratch unit: one cache line
  uint8_t bytes[64];
};

// Visit positions [start, end) of a paged sequence block by block: fn(t, row pointer) with
// t = position - start. `row` elements separate consecutive tokens inside a block.
template <typename T, typename Fn>
inline void for_each_token(const T* cache, const int32_t* table, int64_t start, int64_t end,
                           int64_t block_size, int64_t row, int64_t head_offset, Fn fn) {
  for (int64_t pos = start; pos < end;) {
    const int64_t blk = pos / block_size, off = pos % block_size;
    const int64_t stop = std::min(end, (blk + 1) * block_size);
    const T* base = cache + static_cast<int64_t>(table[blk]) * block_size * row + head_offset;
    for (int64_t o = off; pos < stop; ++o, ++pos) fn(pos - start, base + o * row);
  }
}

// The next block's rows (of `cache`, then of `twin`) as a queue of cache lines to prefetch a
// share at a time between arithmetic. Why: issued as one burst of ~200 at the start of a run
// (for_each_run), the prefetches stall on the core's miss buffers, and perf put ~17% of the
// AVX512-BF16 decode sweep on that stall (Zen 4) even with the whole cache in L3. Spread over
// the key pass and sent to L2 only (prefetcht1: L2 tracks more misses than L1, and pass 2
// reads the values after the whole sequence's keys, by when L1 has evicted them). 64
// sequences x 288 tokens, 30 layers, scattered blocks, alternating: burst into L1 29.3-38.4 ms,
// spread into L1 28.4-33.6, spread into L2 22.9-25.9; 16 x 192: 6.6-7.0 -> 4.6 ms. Two or
// three blocks ahead measured no better than one.
struct SpreadPrefetch {
  const char* base[2] = {nullptr, nullptr};
  int64_t row_bytes = 0, line_bytes = 0, rows_bytes = 0, total = 0, next = 0;
  int c = 0;                      // which cache the next line is of
  // the next line's row offset in the block and offset in that row (flat: offset in the block)
  int64_t row_off = 0, line = 0;
  bool to_l1 = false;
  bool flat = false;  // whole rows: each cache's share of the block is one contiguous range
  void issue(int64_t n) {
    if (flat) {  // a plain run of lines per cache (the per-line walk below costs ~6 ops a line)
      n = std::min(n, total - next);
      next += n;
      while (n > 0) {
        const int64_t m = std::min<int64_t>(n, (rows_bytes - line) / 64);
        const char* p = base[c] + line;
        if (to_l1)
          for (int64_t i = 0; i < m; ++i) __builtin_prefetch(p + 64 * i);
        else
          for (int64_t i = 0; i < m; ++i) __builtin_prefetch(p + 64 * i, 0, 2);
        n -= m;
        if ((line += 64 * m) == rows_bytes) line = 0, ++c;
      }
      return;
    }
    for (const int64_t stop = std::min(total, next + n); next < stop; ++next) {
      const char* p = base[c] + row_off + line;
      if (to_l1)
        __builtin_prefetch(p);
      else
        __builtin_prefetch(p, 0, 2);
      if ((line += 64) == line_bytes) {
        line = 0;
        if ((row_off += row_bytes) == rows_bytes) row_off = 0, ++c;
      }
    }
  }
};

// The rows [head_offset, + head_dim) of every token of block `blk` (of `cache`, then of `twin`
// when given) as a SpreadPrefetch queue.
template <typename T>
inline SpreadPrefetch block_prefetch(const T* cache, const T* twin, int64_t blk,
                                     int64_t block_size, int64_t row, int64_t head_offset,
                                     int64_t head_dim) {
  SpreadPrefetch pf;
  const int64_t base = blk * block_size * row + head_offset;
  pf.base[0] = reinterpret_cast<const char*>(cache + base);
  if (twin) pf.base[1] = reinterpret_cast<const char*>(twin + base);
  const int64_t lines_per_row = (head_dim * static_cast<int64_t>(sizeof(T)) + 63) / 64;
  pf.row_bytes = row * sizeof(T);
  pf.line_bytes = 64 * lines_per_row;
  pf.rows_bytes = block_size * pf.row_bytes;
  pf.total = (twin ? 2 : 1) * block_size * lines_per_row;
  pf.flat = pf.line_bytes == pf.row_bytes;
  return pf;
}

// As for_each_run, but fn(t, ptr, n, pf) gets the next block's prefetches to issue as it goes;
// whatever it leaves is issued when it returns.
template <typename T, typename Fn>
inline void for_each_run_spread(const T* cache, const int32_t* table, int64_t start, int64_t end,
                                int64_t block_size, int64_t row, int64_t head_offset,
                                int64_t head_dim, Fn fn, const T* twin = nullptr) {
  for (int64_t pos = start; pos < end;) {
    const int64_t blk = pos / block_size, off = pos % block_size;
    const int64_t n = std::min(end, (blk + 1) * block_size) - pos;
    SpreadPrefetch pf;
    if ((blk + 1) * block_size < end)
      pf = block_prefetch(cache, twin, table[blk + 1], block_size, row, head_offset, head_dim);
    fn(pos - start,
       cache + (static_cast<int64_t>(table[blk]) * block_size + off) * row + head_offset, n, pf);
    pf.issue(pf.total);
    pos += n;
  }
}

// Visit positions [start, end) as runs of consecutive tokens inside one block: fn(t, ptr, n)
// with t = first position - start, ptr its row, n <= block_size tokens `row` elements apart.
// The next block's rows for this head are prefetched before a run is processed: blocks are
// scattered through the pool, so the hardware prefetcher cannot guess the next one.
template <typename T, typename Fn>
inline void for_each_run(const T* cache, const int32_t* table, int64_t start, int64_t end,
                         int64_t block_size, int64_t row, int64_t head_offset, int64_t head_dim,
                         Fn fn) {
  for_each_run_spread(cache, table, start, end, block_size, row, head_offset, head_dim,
                      [&](int64_t t, const T* p, int64_t n, SpreadPrefetch& pf) {
                        pf.to_l1 = true;
                        pf.issue(pf.total);
                        fn(t, p, n);
                      });
}

#if defined(__AVX512F__)
// soft_cap * tanh(x) per lane, x being the scores already divided by soft_cap
inline __m512 soft_cap16(__m512 x, float soft_cap) {
  alignas(64) float tmp[16];
  _mm512_store_ps(tmp, x);
  for (int i = 0; i < 16; ++i) tmp[i] = std::tanh(tmp[i]) * soft_cap;
  return _mm512_load_ps(tmp);
}

// s[0, L) -> exp(s - max s) in place; returns 1 / their sum
inline float softmax_numerators(float* s, int64_t L) {
  __m512 mv = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + 16 <= L; i += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(s + i));
  float mx = _mm512_reduce_max_ps(mv);
  for (; i < L; ++i) mx = std::max(mx, s[i]);
  return 1.f / exp_shift_sum(s, L, mx);
}

// q . k for one query head against up to 16 keys `row` apart, head_dim 16 * NC: lane j of the
// result is the dot with key j (lanes >= n are 0).
template <typename T, int NC>
struct Dot16 {
  __m512 q[NC];
  explicit Dot16(const T* qp) {
    for (int c = 0; c < NC; ++c) q[c] = load16(qp + 16 * c);
  }
  __m512 operator()(const T* k, int64_t row, int64_t n) const {
    __m512 acc[16];
    for (int64_t j = 0; j < 16; ++j) {
      if (j < n) {
        const T* kr = k + j * row;
        __m512 a = _mm512_mul_ps(q[0], load16(kr));
        for (int c = 1; c < NC; ++c) a = _mm512_fmadd_ps(q[c], load16(kr + 16 * c), a);
        acc[j] = a;
      } else {
        acc[j] = _mm512_setzero_ps();
      }
    }
    return hsum16(acc);
  }
};

// One (sequence, KV head) with head_dim = 16 * NC and its `groups` query heads: scores for
// every head (16 keys per reduction), softmax, then the values with GC heads' accumulators in
// registers per pass over V.
template <typename T, int NC>
void decode_group_avx512(T* out, const T* q, const T* k_cache, const T* v_cache,
                         const int32_t* table, int64_t start, int64_t end, int64_t row,
                         int64_t head_offset, int64_t block_size, int64_t groups, float scale,
                         float soft_cap, std::vector<float>& scores) {
  constexpr int64_t D = 16 * NC;
  constexpr int64_t GC = NC >= 16 ? 1 : 16 / NC;  // heads per V pass (<= 16 accumulators)
  const int64_t L = end - start, Lp = (L + 15) & ~int64_t(15);
  const float pre = soft_cap > 0 ? scale / soft_cap : scale;
  scores.resize(groups * Lp);
  std::vector<float> inv(groups);
  for (int64_t g = 0; g < groups; ++g) {
    const Dot16<T, NC> dot(q + g * D);
    float* s = scores.data() + g * Lp;
    __m512 mv = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for_each_run(k_cache, table, start, end, block_size, row, head_offset, D,
                 [&](int64_t t, const T* k, int64_t n) {
                   for (int64_t j = 0; j < n; j += 16) {
                     const int64_t m = std::min<int64_t>(16, n - j);
                     const __mmask16 mask = static_cast<__mmask16>((1u << m) - 1);
                     __m512 x = _mm512_mul_ps(dot(k + j * row, row, m), _mm512_set1_ps(pre));
                     if (soft_cap > 0) x = soft_cap16(x, soft_cap);
                     _mm512_mask_storeu_ps(s + t + j, mask, x);
                     mv = _mm512_mask_max_ps(mv, mask, mv, x);
                   }
                 });
    inv[g] = 1.f / exp_shift_sum(s, L, _mm512_reduce_max_ps(mv));
  }
  for (int64_t g0 = 0; g0 < groups; g0 += GC) {
    const int64_t gn = std::min(GC, groups - g0);
    __m512 acc[GC][NC];
    for (int64_t g = 0; g < GC; ++g)
      for (int c = 0; c < NC; ++c) acc[g][c] = _mm512_setzero_ps();
    for_each_run(v_cache, table, start, end, block_size, row, head_offset, D,
                 [&](int64_t t, const T* v, int64_t n) {
                   for (int64_t j = 0; j < n; ++j) {
                     __m512 vv[NC];
                     for (int c = 0; c < NC; ++c) vv[c] = load16(v + j * row + 16 * c);
                     for (int64_t g = 0; g < GC; ++g) {
                       if (g >= gn) break;
                       const __m512 p = _mm512_set1_ps(scores[(g0 + g) * Lp + t + j]);
                       for (int c = 0; c < NC; ++c) acc[g][c] = _mm512_fmadd_ps(p, vv[c], acc[g][c]);
                     }
                   }
                 });
    for (int64_t g = 0; g < gn; ++g) {
      const __m512 iv = _mm512_set1_ps(inv[g0 + g]);
      for (int c = 0; c < NC; ++c) store16(out + (g0 + g) * D + 16 * c, _mm512_mul_ps(acc[g][c], iv));
    }
  }
}
#endif

#if defined(__AVX512BF16__)
// decode_group_bf16's value pass for GN query heads of one KV head (see there for the pair
// layout). Plain loops, not a callback through for_each_run: GCC kept the accumulators of the
// closure version on the stack (~70 zmm spills; here none), and with them the whole decode sweep
// took ~20% longer (64 sequences x 288 tokens, 30 layers, Zen 4).
template <int NP, int GN>
inline void pv_sweep(bf16* out, const uint16_t* p_all, int64_t Lp, const float* inv,
                     const bf16* v_cache, const int32_t* table, int64_t start, int64_t end,
                     int64_t row, int64_t head_off, int64_t block_size) {
  constexpr int64_t D = 32 * NP;
  const __m512i zero = _mm512_setzero_si512();
  __m512 acc[GN][2 * NP];
  for (int g = 0; g < GN; ++g)
    for (int c = 0; c < 2 * NP; ++c) acc[g][c] = _mm512_setzero_ps();
  // Block by block, rows paired inside a block; a block's odd last row pairs with zeros (its
  // partner p, the next row's, then multiplies 0), so no pair spans two blocks.
  const int64_t L = end - start;
  for (int64_t t = 0; t < L;) {
    const int64_t pos = start + t, blk = pos / block_size, off = pos % block_size;
    const int64_t n = std::min(L - t, block_size - off);
    const bf16* base =
        v_cache + (static_cast<int64_t>(table[blk]) * block_size + off) * row + head_off;
    if (t + n < L) {  // the next block's rows of this head into L1, as for_each_run does
      SpreadPrefetch pf = block_prefetch<bf16>(v_cache, nullptr, table[blk + 1], block_size, row,
                                               head_off, D);
      pf.to_l1 = true;
      pf.issue(pf.total);
    }
    for (int64_t j = 0; j < n; j += 2) {
      const bf16* v0 = base + j * row;
      __m512bh lo[NP], hi[NP];
      for (int c = 0; c < NP; ++c) {
        const __m512i a = _mm512_loadu_si512(v0 + 32 * c);
        const __m512i b = j + 1 < n ? _mm512_loadu_si512(v0 + row + 32 * c) : zero;
        lo[c] = reinterpret_cast<__m512bh>(_mm512_unpacklo_epi16(a, b));
        hi[c] = reinterpret_cast<__m512bh>(_mm512_unpackhi_epi16(a, b));
      }
      for (int g = 0; g < GN; ++g) {
        uint32_t pp;
        std::memcpy(&pp, p_all + g * Lp + t + j, 4);  // (p_t, p_t+1)
        const __m512bh pv = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(pp)));
        for (int c = 0; c < NP; ++c) {
          acc[g][2 * c] = _mm512_dpbf16_ps(acc[g][2 * c], lo[c], pv);
          acc[g][2 * c + 1] = _mm512_dpbf16_ps(acc[g][2 * c + 1], hi[c], pv);
        }
      }
    }
    t += n;
  }
  // lane i of acc[2c] holds d = 32c + 8(i/4) + i%4, of acc[2c+1] the same + 4
  const __m512i idx_lo = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i idx_hi = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int g = 0; g < GN; ++g) {
    const __m512 iv = _mm512_set1_ps(inv[g]);
    for (int c = 0; c < NP; ++c) {
      const __m512 a = acc[g][2 * c], b = acc[g][2 * c + 1];
      bf16* o = out + g * D + 32 * c;
      store16(o, _mm512_mul_ps(_mm512_permutex2var_ps(a, idx_lo, b), iv));
      store16(o + 16, _mm512_mul_ps(_mm512_permutex2var_ps(a, idx_hi, b), iv));
    }
  }
}

// bf16 with AVX512-BF16, head_dim = 32 * NP: both products run as vdpbf16ps (pairs of bf16
// products accumulated in fp32), so no element is ever converted.
//  - q . k: q's 32-element chunks stay in registers; 16 keys per transpose-and-add reduction;
//    a block's keys are read from memory once and reused from L1 by every head of the group.
//    The KV heads [head_offset / D, + kv_heads) of one work item are swept together, so each
//    block is read as one contiguous run (its rows of all those heads), not once per head:
//    10-25% faster at 64-256 sequences on Zen 4, the same bits.
//  - p . v: two consecutive value rows are interleaved (vpunpck[lh]wd) into (v_t, v_t+1)
//    pairs and multiplied with (p_t, p_t+1) in bf16, 4 heads' accumulators in registers.
//    Interleaving permutes d inside each 128-bit lane; the permutation is undone at the end.
//    p is rounded to bf16 as torch's CPU flash attention rounds it for its P.V matmul.
template <int NP>
void decode_group_bf16(bf16* out, const bf16* q, const bf16* k_cache, const bf16* v_cache,
                       const int32_t* table, int64_t start, int64_t end, int64_t row,
                       int64_t head_offset, int64_t block_size, int64_t kv_heads, int64_t per_kv,
                       float scale, float soft_cap, std::vector<float>& scores) {
  constexpr int64_t D = 32 * NP;
  const int64_t groups = kv_heads * per_kv;
  const int64_t L = end - start, Lp = (L + 17) & ~int64_t(15);  // + room for a pair's partner
  const float pre = soft_cap > 0 ? scale / soft_cap : scale;
  scores.resize(groups * Lp + (groups * Lp + 1) / 2 + 16);
  float* s_all = scores.data();
  uint16_t* p_all = reinterpret_cast<uint16_t*>(s_all + groups * Lp);  // bf16 probabilities
  std::vector<float> inv(groups);
  const __m512 prev = _mm512_set1_ps(pre);
  // pass 1: scores of every head of the group
  for_each_run_spread(k_cache, table, start, end, block_size, row, head_offset, kv_heads * D,
               [&](int64_t t, const bf16* k, int64_t n, SpreadPrefetch& pf) {
                 const int64_t share = (pf.total + groups * ((n + 15) / 16) - 1) /
                                       (groups * ((n + 15) / 16));
                 for (int64_t j = 0; j < n; j += 16) {
                   const int64_t m = std::min<int64_t>(16, n - j);
                   for (int64_t g = 0, kvh = 0, gg = 0; g < groups; ++g) {
                     pf.issue(share);
                     const bf16* kj = k + j * row + kvh * D;  // no division per head
                     if (++gg == per_kv) gg = 0, ++kvh;
                     __m512bh qv[NP];
                     for (int c = 0; c < NP; ++c)
                       qv[c] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(q + g * D + 32 * c));
                     // constant indices only (unrolled, guarded), so acc stays in registers
                     __m512 acc[16];
#pragma GCC unroll 16
                     for (int r = 0; r < 16; ++r) {
                       acc[r] = _mm512_setzero_ps();
                       if (r < m)
                         for (int c = 0; c < NP; ++c)
                           acc[r] = _mm512_dpbf16_ps(acc[r], qv[c], reinterpret_cast<__m512bh>(
                               _mm512_loadu_si512(kj + r * row + 32 * c)));
                     }
                     __m512 x = _mm512_mul_ps(hsum16(acc), prev);
                     if (soft_cap > 0) x = soft_cap16(x, soft_cap);
                     _mm512_mask_storeu_ps(s_all + g * Lp + t + j,
                                           static_cast<__mmask16>((1u << m) - 1), x);
                   }
                 }
               }, v_cache);
  // softmax numerators, rounded to bf16 for the P.V products (zero-padded to even length)
  for (int64_t g = 0; g < groups; ++g) {
    float* s = s_all + g * Lp;
    inv[g] = softmax_numerators(s, L);
    s[L] = 0.f;  // the partner of an odd last token: p = 0
    uint16_t* pb = p_all + g * Lp;
    int64_t i = 0;
    for (; i + 16 <= L + 1; i += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pb + i), bf16_bits(_mm512_loadu_ps(s + i)));
    for (; i < L + 1; ++i) pb[i] = from_float<bf16>(i < L ? s[i] : 0.f).bits;
  }
  // pass 2: values, up to 4 heads of one KV head per sweep
  for (int64_t g0 = 0; g0 < groups;) {
    const int64_t kvh = g0 / per_kv;
    const int64_t gn = std::min<int64_t>(4, (kvh + 1) * per_kv - g0);
#define INFERD_PV(GN)                                                                         \
  pv_sweep<NP, GN>(out + g0 * D, p_all + g0 * Lp, Lp, inv.data() + g0, v_cache, table, start, \
                   end, row, head_offset + kvh * D, block_size)
    switch (gn) {
      case 1: INFERD_PV(1); break;
      case 2: INFERD_PV(2); break;
      case 3: INFERD_PV(3); break;
      default: INFERD_PV(4); break;
    }
#undef INFERD_PV
    g0 += gn;
  }
}
#endif  // __AVX512BF16__

#if defined(INFERD_HAS_AMX)
// bf16 on AMX tiles, head_dim = 32 * NCC (1, 2, 4 or 8). A work item is one sequence and KV
// heads [kv0, kv0 + nkv) with their nq = nkv * G <= 16 query heads. Why: the AVX512-BF16 path
// above spends ~14 ns per token and KV head on transposes, reductions and accumulators the
// compiler spills (perf, Sapphire Rapids, K/V in L2); here both products read the cache rows
// as tiles as they lie, with a few tile ops per 16 keys.
//  - Scores, per 16 keys of a block: C^T [16 keys x 16 heads] += K [16 keys x 32 dims] .
//    Q^T [32 dims x 16 heads]: K is a tile of 16 cache rows; Q^T, in pair layout, is built
//    once per item with each KV head's columns alone nonzero (other heads' columns are exact
//    zeros, so one C^T holds every head's dot products). Dims chunk c accumulates into tile
//    c % 4 and the tiles are added in that order, so an item of one KV head and an item of
//    several give the same bits. One 16 x 16 transpose per 16 keys gives each head's scores.
//  - Softmax over the whole row (fp32, as the path above), p rounded to bf16.
//  - Values, per 16 keys and 32 dims: a tile of 16 cache rows of V is a valid B operand whose
//    "pairs" are two neighbouring dims of one key, so it runs twice: O_even [heads x 16] +=
//    (p, 0)-pairs . V and O_odd += (0, p)-pairs . V give dims 2n and 2n + 1 (half the
//    products are zeros; the tiles have arithmetic to spare, and nothing is repacked).
//  - Keys past the end of the last block (or before a sliding window) are masked: their
//    scores are never stored and p = 0; their V rows, which may hold anything (NaN times 0 is
//    NaN), go through a zeroed copy.
// Needs block_size % 16 == 0 (a 16-key tile never leaves its block).
template <int NCC>
void decode_group_amx(bf16* out, const bf16* q, const bf16* k_cache, const bf16* v_cache,
                      const int32_t* table, int64_t start, int64_t end, int64_t row,
                      int64_t head_offset, int64_t block_size, int64_t nkv, int64_t G,
                      float scale, float soft_cap, std::vector<Line>& scratch) {
  constexpr int64_t D = 32 * NCC;
  constexpr int NT = NCC < 4 ? NCC : 4;  // score tiles
  const int64_t nq = nkv * G;
  const int64_t base = start & ~int64_t(15);            // key index 0 of the rows below
  const int64_t Lw = (end - base + 15) & ~int64_t(15);  // keys per row, whole 16-key groups
  const int64_t i0 = start - base, L = end - start;
  const float pre = soft_cap > 0 ? scale / soft_cap : scale;
  // scratch, in 64-byte units: Q^T tiles [nkv][NCC][16]; scores [nq][Lw] fp32; (p, 0) and
  // (0, p) pairs [nq + 16][Lw] each (a P tile reads 16 rows); C tiles [4][16]; V tiles [2][16]
  const int64_t n_qt = nkv * NCC * 16, n_s = nq * Lw / 16, n_p = (nq + 16) * Lw / 16;
  scratch.resize(n_qt + n_s + 2 * n_p + 96);
  __m512i* qt = reinterpret_cast<__m512i*>(scratch.data());
  float* s_all = reinterpret_cast<float*>(qt + n_qt);
  uint32_t* pe = reinterpret_cast<uint32_t*>(qt + n_qt + n_s);
  uint32_t* po = reinterpret_cast<uint32_t*>(qt + n_qt + n_s + n_p);
  float (*cbuf)[16][16] = reinterpret_cast<float (*)[16][16]>(qt + n_qt + n_s + 2 * n_p);
  __m512i* vtmp = qt + n_qt + n_s + 2 * n_p + 64;
  for (int c = 0; c < NCC; ++c) {
    __m512i rows[16];
    for (int n = 0; n < 16; ++n)
      rows[n] = n < nq ? _mm512_loadu_si512(q + n * D + 32 * c) : _mm512_setzero_si512();
    transpose16(rows);  // rows[r] lane n = head n's dims (32c + 2r, 32c + 2r + 1)
    for (int64_t h = 0; h < nkv; ++h) {
      const __mmask16 own = static_cast<__mmask16>(((1u << G) - 1) << (h * G));
      for (int r = 0; r < 16; ++r) qt[(h * NCC + c) * 16 + r] = _mm512_maskz_mov_epi32(own, rows[r]);
    }
  }
  const __m512 prev = _mm512_set1_ps(pre);
  // pass 1: scores. The next block's K (into L1) and V (into L2, for pass 2) are prefetched a
  // share per tile step, not in one burst: a burst of ~200 prefetches stalls on the line fill
  // buffers while the tiles sit idle (64 x 280 keys, 30 layers: 27.6 against 29.4 ms, ~31 with
  // the burst).
  for (int64_t t0 = base; t0 < end; t0 += 16) {
    const int64_t blk = t0 / block_size, off = t0 % block_size;
    const int64_t at = (static_cast<int64_t>(table[blk]) * block_size + off) * row + head_offset;
    zero_accumulators(NT);
    const bf16* kb = k_cache + at;
    const bool ahead = off + 16 == block_size && t0 + 16 < end;
    const int64_t nxt = ahead ? static_cast<int64_t>(table[blk + 1]) * block_size * row + head_offset : 0;
    const char* nk = reinterpret_cast<const char*>(k_cache + nxt);
    const char* nv = reinterpret_cast<const char*>(v_cache + nxt);
    for (int64_t h = 0; h < nkv; ++h) {
#pragma GCC unroll 8
      for (int c = 0; c < NCC; ++c) {
        if (ahead)  // this step's share of the next block: head h's chunk c of its 16 rows
          for (int64_t o = 0; o < 16; ++o) {
            __builtin_prefetch(nk + (o * row + h * D + 32 * c) * 2);
            __builtin_prefetch(nv + (o * row + h * D + 32 * c) * 2, 0, 2);
          }
        const bf16* a = kb + h * D + 32 * c;
        const __m512i* b = qt + (h * NCC + c) * 16;
        switch (c & 3) {  // tile numbers are immediates
          case 0: _tile_loadd(4, a, row * 2); _tile_loadd(6, b, 64); _tile_dpbf16ps(0, 4, 6); break;
          case 1: _tile_loadd(5, a, row * 2); _tile_loadd(7, b, 64); _tile_dpbf16ps(1, 5, 7); break;
          case 2: _tile_loadd(4, a, row * 2); _tile_loadd(6, b, 64); _tile_dpbf16ps(2, 4, 6); break;
          default: _tile_loadd(5, a, row * 2); _tile_loadd(7, b, 64); _tile_dpbf16ps(3, 5, 7); break;
        }
      }
    }
    store_accumulators(cbuf, NT);
    __m512i rows[16];
    for (int j = 0; j < 16; ++j) {
      __m512 x = _mm512_load_ps(cbuf[0][j]);
      for (int t = 1; t < NT; ++t) x = _mm512_add_ps(x, _mm512_load_ps(cbuf[t][j]));
      rows[j] = _mm512_castps_si512(x);
    }
    transpose16(rows);  // rows[n] lane j = head n's score of key t0 + j
    const int64_t lo = std::max(start, t0) - t0, hi = std::min(end, t0 + 16) - t0;
    const __mmask16 valid = static_cast<__mmask16>(((1u << hi) - 1) & ~((1u << lo) - 1));
    for (int64_t n = 0; n < nq; ++n) {
      __m512 x = _mm512_mul_ps(_mm512_castsi512_ps(rows[n]), prev);
      if (soft_cap > 0) x = soft_cap16(x, soft_cap);
      _mm512_mask_storeu_ps(s_all + n * Lw + (t0 - base), valid, x);
    }
  }
  // softmax numerators, rounded to bf16, as (p, 0) and (0, p) pairs; 0 outside the keys
  float inv[16];
  for (int64_t n = 0; n < nq; ++n) {
    inv[n] = softmax_numerators(s_all + n * Lw + i0, L);
    const float* sr = s_all + n * Lw;
    for (int64_t j = 0; j < Lw; j += 16) {
      const int64_t lo = std::clamp<int64_t>(i0 - j, 0, 16), hi = std::clamp<int64_t>(i0 + L - j, 0, 16);
      const __mmask16 k = static_cast<__mmask16>(((1u << hi) - 1) & ~((1u << lo) - 1));
      const __m512i bits = _mm512_cvtepu16_epi32(bf16_bits(_mm512_maskz_loadu_ps(k, sr + j)));
      _mm512_storeu_si512(pe + n * Lw + j, bits);
      _mm512_storeu_si512(po + n * Lw + j, _mm512_slli_epi32(bits, 16));
    }
  }
  // pass 2: values, per KV head and 64 dims (even and odd dims of two 32-dim chunks)
  const __m512i even_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i odd_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (int64_t h = 0; h < nkv; ++h) {
    const bf16* vh = v_cache + head_offset + h * D;
    const uint32_t* pe_h = pe + h * G * Lw;
    const uint32_t* po_h = po + h * G * Lw;
    for (int c0 = 0; c0 < NCC; c0 += 2) {
      const bool two = c0 + 1 < NCC;
      zero_accumulators(two ? 4 : 2);
      for (int64_t t0 = base; t0 < end; t0 += 16) {
        const int64_t blk = t0 / block_size, off = t0 % block_size;
        const bf16* vb = vh + (static_cast<int64_t>(table[blk]) * block_size + off) * row + 32 * c0;
        int64_t stride = row * 2;
        if (t0 < start || t0 + 16 > end) {  // a partial group: only its keys' rows, zeros around
          const int64_t lo = std::max(start, t0) - t0, hi = std::min(end, t0 + 16) - t0;
          for (int64_t j = 0; j < 16; ++j) {
            const bool ok = j >= lo && j < hi;
            vtmp[j] = ok ? _mm512_loadu_si512(vb + j * row) : _mm512_setzero_si512();
            if (two) vtmp[16 + j] = ok ? _mm512_loadu_si512(vb + j * row + 32) : _mm512_setzero_si512();
          }
          vb = reinterpret_cast<const bf16*>(vtmp);
          stride = 64;
        }
        _tile_loadd(4, pe_h + (t0 - base), Lw * 4);
        _tile_loadd(5, po_h + (t0 - base), Lw * 4);
        _tile_loadd(6, vb, stride);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 5, 6);
        if (two) {
          _tile_loadd(7, stride == 64 ? vb + 16 * 32 : vb + 32, stride);
          _tile_dpbf16ps(2, 4, 7);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
      store_accumulators(cbuf, two ? 4 : 2);
      for (int64_t g = 0; g < G; ++g) {
        const __m512 iv = _mm512_set1_ps(inv[h * G + g]);
        for (int e = 0; e < (two ? 2 : 1); ++e) {
          // cbuf[2e][g][n]: dim 32 (c0 + e) + 2n; cbuf[2e + 1][g][n]: the odd one after it
          const __m512 ev = _mm512_load_ps(cbuf[2 * e][g]), od = _mm512_load_ps(cbuf[2 * e + 1][g]);
          bf16* o = out + (h * G + g) * D + 32 * (c0 + e);
          store16(o, _mm512_mul_ps(_mm512_permutex2var_ps(ev, even_idx, od), iv));
          store16(o + 16, _mm512_mul_ps(_mm512_permutex2var_ps(ev, odd_idx, od), iv));
        }
      }
    }
  }
}
#endif  // INFERD_HAS_AMX


// Portable path (any head_dim, any CPU): the same two passes in plain loops.
template <typename T>
void decode_head_generic(T* out, const T* q, const T* k_cache, const T* v_cache,
                         const int32_t* table, int64_t start, int64_t end, int64_t row,
                         int64_t head_offset, int64_t block_size, int64_t groups, int64_t D,
                         float scale, float soft_cap, std::vector<float>& scores,
                         std::vector<float>& acc) {
  const int64_t L = end - start;
  const float pre = soft_cap > 0 ? scale / soft_cap : scale;
  scores.resize(L);
  acc.resize(D);
  for (int64_t g = 0; g < groups; ++g) {
    const T* qg = q + g * D;
    float m = -std::numeric_limits<float>::infinity();
    for_each_token(k_cache, table, start, end, block_size, row, head_offset,
                   [&](int64_t t, const T* kr) {
                     float x = 0.f;
                     for (int64_t d = 0; d < D; ++d) x += to_float(qg[d]) * to_float(kr[d]);
                     x *= pre;
                     if (soft_cap > 0) x = std::tanh(x) * soft_cap;
                     scores[t] = x;
                     m = std::max(m, x);
                   });
    float sum = 0.f;
    for (int64_t t = 0; t < L; ++t) sum += (scores[t] = std::exp(scores[t] - m));
    std::fill(acc.begin(), acc.end(), 0.f);
    for_each_token(v_cache, table, start, end, block_size, row, head_offset,
                   [&](int64_t t, const T* vr) {
                     for (int64_t d = 0; d < D; ++d) acc[d] += scores[t] * to_float(vr[d]);
                   });
    for (int64_t d = 0; d < D; ++d) out[g * D + d] = from_float<T>(acc[d] / sum);
  }
}

// One sequence's KV heads [kv_head, kv_head + kv_heads), `groups` query heads each (q and out
// point at the first one's): the vectorised path for the usual head sizes, else portable code.
template <typename T>
void decode_heads(T* out, const T* q, const T* k_cache, const T* v_cache, const int32_t* table,
                  int64_t len, int64_t window, int64_t row, int64_t kv_head, int64_t kv_heads,
                  int64_t block_size, int64_t groups, int64_t head_dim, float scale,
                  float soft_cap, bool amx, std::vector<float>& scores, std::vector<float>& acc,
                  std::vector<Line>& tiles) {
  const int64_t start = window > 0 ? std::max<int64_t>(0, len - window) : 0;
#if defined(INFERD_HAS_AMX)
  if constexpr (std::is_same_v<T, bf16>) {
    if (amx) {  // chunks of KV heads with at most 16 query heads (decode_attention checked)
      const int64_t step = 16 / groups;
      for (int64_t h = 0; h < kv_heads; h += step) {
        const int64_t n = std::min(step, kv_heads - h);
        const int64_t off = h * groups * head_dim;
#define INFERD_AMX(NCC)                                                                        \
  decode_group_amx<NCC>(out + off, q + off, k_cache, v_cache, table, start, len, row,         \
                        (kv_head + h) * head_dim, block_size, n, groups, scale, soft_cap, tiles); \
  break
        switch (head_dim) {
          case 32: INFERD_AMX(1);
          case 64: INFERD_AMX(2);
          case 128: INFERD_AMX(4);
          default: INFERD_AMX(8);
        }
#undef INFERD_AMX
      }
      return;
    }
  }
#else
  (void)amx;
  (void)tiles;
#endif
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, bf16>) {
#define INFERD_BF16(NP)                                                                      \
  return decode_group_bf16<NP>(out, q, k_cache, v_cache, table, start, len, row,            \
                               kv_head * head_dim, block_size, kv_heads, groups, scale,      \
                               soft_cap, scores)
    switch (head_dim) {
      case 32: INFERD_BF16(1);
      case 64: INFERD_BF16(2);
      case 128: INFERD_BF16(4);
      case 256: INFERD_BF16(8);
      default: break;
    }
#undef INFERD_BF16
  }
#endif
  for (int64_t h = 0; h < kv_heads; ++h) {
    T* o = out + h * groups * head_dim;
    const T* qh = q + h * groups * head_dim;
    const int64_t off = (kv_head + h) * head_dim;
#if defined(__AVX512F__)
#define INFERD_HEAD(NC)                                                                      \
  decode_group_avx512<T, NC>(o, qh, k_cache, v_cache, table, start, len, row, off,           \
                             block_size, groups, scale, soft_cap, scores);                   \
  continue
    switch (head_dim) {
      case 32: INFERD_HEAD(2);
      case 64: INFERD_HEAD(4);
      case 96: INFERD_HEAD(6);
      case 128: INFERD_HEAD(8);
      case 256: INFERD_HEAD(16);
      default: break;
    }
#undef INFERD_HEAD
#endif
    decode_head_generic<T>(o, qh, k_cache, v_cache, table, start, len, row, off, block_size,
                           groups, head_dim, scale, soft_cap, scores, acc);
  }
}

template <typename T>
void decode_attention(T* out, const T* q, int64_t q_token_stride, const T* kv_cache,
                      int64_t num_blocks, const int32_t* block_tables, int64_t table_stride,
                      const int32_t* seq_lens, int64_t num_seqs, int64_t num_heads,
                      int64_t num_kv_heads, int64_t head_dim, int64_t block_size, float scale,
                      int64_t window, float soft_cap, bool use_amx) {
  const int64_t groups = num_heads / num_kv_heads;
  bool amx = false;
#if defined(INFERD_HAS_AMX)
  amx = use_amx && std::is_same_v<T, bf16> && groups <= 16 && block_size % 16 == 0 &&
        (head_dim == 32 || head_dim == 64 || head_dim == 128 || head_dim == 256) &&
        inferd_amx_init() == 1;
#else
  (void)use_amx;
#endif
  const T* k_cache = kv_cache;
  const T* v_cache = kv_cache + num_blocks * block_size * num_kv_heads * head_dim;
  const int64_t row = num_kv_heads * head_dim;  // elements between tokens inside a block
  // A work item is a whole sequence when there are enough of them: one sweep over its blocks
  // then reads each block's keys of all KV heads (one contiguous run of memory) together.
  // Few sequences (batch-1 decode) split by KV head instead, so every thread has work.
  const int64_t per_item = num_seqs >= 2 * omp_get_max_threads() ? num_kv_heads : 1;
  const int64_t work = num_seqs * (num_kv_heads / per_item);
#pragma omp parallel
  {
    std::vector<float> scores, acc;
    std::vector<Line> tiles;
#if defined(INFERD_HAS_AMX)
    if (amx) configure_tiles();
#endif
#pragma omp for schedule(dynamic, 1)
    for (int64_t w = 0; w < work; ++w) {
      const int64_t i = w * per_item, b = i / num_kv_heads, kvh = i % num_kv_heads;
      decode_heads<T>(out + (b * num_heads + kvh * groups) * head_dim,
                      q + b * q_token_stride + kvh * groups * head_dim, k_cache, v_cache,
                      block_tables + b * table_stride, seq_lens[b], window, row, kvh, per_item,
                      block_size, groups, head_dim, scale, soft_cap, amx, scores, acc, tiles);
    }
#if defined(INFERD_HAS_AMX)
    if (amx) _tile_release();
#endif
  }
}

template <typename T>
void write_kv(T* kv_cache, int64_t num_slots, const T* k, int64_t k_stride, const T* v,
              int64_t v_stride, const int64_t* slots, int64_t num_tokens, int64_t row) {
  T* k_cache = kv_cache;
  T* v_cache = kv_cache + num_slots * row;
  for (int64_t t = 0; t < num_tokens; ++t) {
    std::memcpy(k_cache + slots[t] * row, k + t * k_stride, row * sizeof(T));
    std::memcpy(v_cache + slots[t] * row, v + t * v_stride, row * sizeof(T));
  }
}

}  // namespace
}  // namespace inferd

using namespace inferd;

extern "C" {

// out [num_seqs, H, D] contiguous; q [num_seqs, H, D] with token stride q_token_stride (heads
// and elements contiguous); kv_cache [2, num_blocks, block_size, Hkv, D] contiguous;
// block_tables int32 [num_seqs, table_stride]; seq_lens int32 [num_seqs] (context incl. the
// query token). window <= 0: full attention; soft_cap <= 0: none. use_amx: bf16 on AMX tiles
// where the library has them and the process was granted them (else AVX512-BF16 / portable).
void inferd_decode_attention(int dtype, void* out, const void* q, int64_t q_token_stride,
                             const void* kv_cache, int64_t num_blocks, const int32_t* block_tables,
                             int64_t table_stride, const int32_t* seq_lens, int64_t num_seqs,
                             int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                             int64_t block_size, float scale, int64_t window, float soft_cap,
                             int64_t use_amx) {
#define INFERD_DECODE(T)                                                                   \
  decode_attention<T>(static_cast<T*>(out), static_cast<const T*>(q), q_token_stride,      \
                      static_cast<const T*>(kv_cache), num_blocks, block_tables, table_stride, \
                      seq_lens, num_seqs, num_heads, num_kv_heads, head_dim, block_size, scale, \
                      window, soft_cap, use_amx != 0)
  if (dtype == F32) INFERD_DECODE(float);
  else if (dtype == BF16) INFERD_DECODE(bf16);
  else INFERD_DECODE(_Float16);
#undef INFERD_DECODE
}

// kv_cache [2, num_slots, row] contiguous; k/v [num_tokens, row] with the given token strides;
// slots int64 [num_tokens], each in [0, num_slots).
void inferd_write_kv(int dtype, void* kv_cache, int64_t num_slots, const void* k, int64_t k_stride,
                     const void* v, int64_t v_stride, const int64_t* slots, int64_t num_tokens,
                     int64_t row) {
  if (dtype == F32)
    write_kv(static_cast<float*>(kv_cache), num_slots, static_cast<const float*>(k), k_stride,
             static_cast<const float*>(v), v_stride, slots, num_tokens, row);
  else  // bf16 and f16 are both 2-byte copies
    write_kv(static_cast<bf16*>(kv_cache), num_slots, static_cast<const bf16*>(k), k_stride,
             static_cast<const bf16*>(v), v_stride, slots, num_tokens, row);
}

}  // extern "C"
