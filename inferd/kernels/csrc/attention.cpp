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

// Visit positions [start, end) as runs of consecutive tokens inside one block: fn(t, ptr, n)
// with t = first position - start, ptr its row, n <= block_size tokens `row` elements apart.
// The next block's rows for this head are prefetched while a run is processed: blocks are
// scattered through the pool, so the hardware prefetcher cannot guess the next one. With a
// `twin` cache the same rows of it are prefetched too (the key pass fetches the values, which
// the value pass then finds in L2: the sweep is bound by memory latency, not arithmetic).
template <typename T, typename Fn>
inline void for_each_run(const T* cache, const int32_t* table, int64_t start, int64_t end,
                         int64_t block_size, int64_t row, int64_t head_offset, int64_t head_dim,
                         Fn fn, const T* twin = nullptr) {
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t pos = start; pos < end;) {
    const int64_t blk = pos / block_size, off = pos % block_size;
    const int64_t n = std::min(end, (blk + 1) * block_size) - pos;
    if ((blk + 1) * block_size < end) {
      const int64_t base = static_cast<int64_t>(table[blk + 1]) * block_size * row + head_offset;
      for (const T* c : {cache, twin}) {
        if (!c) continue;
        const char* next = reinterpret_cast<const char*>(c + base);
        for (int64_t o = 0; o < block_size; ++o)
          for (int64_t d = 0; d < head_dim; d += kLine)
            __builtin_prefetch(next + (o * row + d) * sizeof(T));
      }
    }
    fn(pos - start,
       cache + (static_cast<int64_t>(table[blk]) * block_size + off) * row + head_offset, n);
    pos += n;
  }
}

#if defined(__AVX512F__)
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
                     if (soft_cap > 0) {
                       alignas(64) float tmp[16];
                       _mm512_store_ps(tmp, x);
                       for (int i = 0; i < m; ++i) tmp[i] = std::tanh(tmp[i]) * soft_cap;
                       x = _mm512_load_ps(tmp);
                     }
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
  for_each_run(k_cache, table, start, end, block_size, row, head_offset, kv_heads * D,
               [&](int64_t t, const bf16* k, int64_t n) {
                 for (int64_t j = 0; j < n; j += 16) {
                   const int64_t m = std::min<int64_t>(16, n - j);
                   for (int64_t g = 0; g < groups; ++g) {
                     const bf16* kj = k + j * row + (g / per_kv) * D;
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
                     if (soft_cap > 0) {
                       alignas(64) float tmp[16];
                       _mm512_store_ps(tmp, x);
                       for (int i = 0; i < m; ++i) tmp[i] = std::tanh(tmp[i]) * soft_cap;
                       x = _mm512_load_ps(tmp);
                     }
                     _mm512_mask_storeu_ps(s_all + g * Lp + t + j,
                                           static_cast<__mmask16>((1u << m) - 1), x);
                   }
                 }
               }, v_cache);
  // softmax numerators, rounded to bf16 for the P.V products (zero-padded to even length)
  for (int64_t g = 0; g < groups; ++g) {
    float* s = s_all + g * Lp;
    __m512 mv = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    int64_t i = 0;
    for (; i + 16 <= L; i += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(s + i));
    float mx = _mm512_reduce_max_ps(mv);
    for (; i < L; ++i) mx = std::max(mx, s[i]);
    inv[g] = 1.f / exp_shift_sum(s, L, mx);
    s[L] = 0.f;  // the partner of an odd last token: p = 0
    uint16_t* pb = p_all + g * Lp;
    for (i = 0; i + 16 <= L + 1; i += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pb + i), bf16_bits(_mm512_loadu_ps(s + i)));
    for (; i < L + 1; ++i) pb[i] = from_float<bf16>(i < L ? s[i] : 0.f).bits;
  }
  // pass 2: values, 4 heads per sweep
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t g0 = 0; g0 < groups;) {
    const int64_t kvh = g0 / per_kv;
    const int64_t gn = std::min<int64_t>(4, (kvh + 1) * per_kv - g0);
    __m512 acc[4][2 * NP];
    for (int g = 0; g < 4; ++g)
      for (int c = 0; c < 2 * NP; ++c) acc[g][c] = _mm512_setzero_ps();
    // A pair may straddle two runs (odd run length): carry the first row over.
    const bf16* pending = nullptr;
    int64_t pending_t = 0;
    auto pair = [&](int64_t t, const bf16* v0, const bf16* v1) {
      __m512bh lo[NP], hi[NP];
      for (int c = 0; c < NP; ++c) {
        const __m512i a = _mm512_loadu_si512(v0 + 32 * c);
        const __m512i b = v1 ? _mm512_loadu_si512(v1 + 32 * c) : zero;
        lo[c] = reinterpret_cast<__m512bh>(_mm512_unpacklo_epi16(a, b));
        hi[c] = reinterpret_cast<__m512bh>(_mm512_unpackhi_epi16(a, b));
      }
      for (int64_t g = 0; g < 4; ++g) {
        if (g >= gn) break;
        uint32_t pp;
        std::memcpy(&pp, p_all + (g0 + g) * Lp + t, 4);  // (p_t, p_t+1)
        const __m512bh pv = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(pp)));
        for (int c = 0; c < NP; ++c) {
          acc[g][2 * c] = _mm512_dpbf16_ps(acc[g][2 * c], lo[c], pv);
          acc[g][2 * c + 1] = _mm512_dpbf16_ps(acc[g][2 * c + 1], hi[c], pv);
        }
      }
    };
    for_each_run(v_cache, table, start, end, block_size, row, head_offset + kvh * D, D,
                 [&](int64_t t, const bf16* v, int64_t n) {
                   int64_t j = 0;
                   if (pending) {
                     pair(pending_t, pending, v);
                     pending = nullptr;
                     j = 1;
                   }
                   for (; j + 1 < n; j += 2) pair(t + j, v + j * row, v + (j + 1) * row);
                   if (j < n) {
                     pending = v + j * row;
                     pending_t = t + j;
                   }
                 });
    if (pending) pair(pending_t, pending, nullptr);
    // lane i of acc[2c] holds d = 32c + 8(i/4) + i%4, of acc[2c+1] the same + 4
    const __m512i idx_lo = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i idx_hi = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int64_t g = 0; g < gn; ++g) {
      const __m512 iv = _mm512_set1_ps(inv[g0 + g]);
      for (int c = 0; c < NP; ++c) {
        const __m512 a = acc[g][2 * c], b = acc[g][2 * c + 1];
        bf16* o = out + (g0 + g) * D + 32 * c;
        store16(o, _mm512_mul_ps(_mm512_permutex2var_ps(a, idx_lo, b), iv));
        store16(o + 16, _mm512_mul_ps(_mm512_permutex2var_ps(a, idx_hi, b), iv));
      }
    }
    g0 += gn;
  }
}
#endif  // __AVX512BF16__


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
                  float soft_cap, std::vector<float>& scores, std::vector<float>& acc) {
  const int64_t start = window > 0 ? std::max<int64_t>(0, len - window) : 0;
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
                      int64_t window, float soft_cap) {
  const int64_t groups = num_heads / num_kv_heads;
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
#pragma omp for schedule(dynamic, 1)
    for (int64_t w = 0; w < work; ++w) {
      const int64_t i = w * per_item, b = i / num_kv_heads, kvh = i % num_kv_heads;
      decode_heads<T>(out + (b * num_heads + kvh * groups) * head_dim,
                      q + b * q_token_stride + kvh * groups * head_dim, k_cache, v_cache,
                      block_tables + b * table_stride, seq_lens[b], window, row, kvh, per_item,
                      block_size, groups, head_dim, scale, soft_cap, scores, acc);
    }
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
// query token). window <= 0: full attention; soft_cap <= 0: none.
void inferd_decode_attention(int dtype, void* out, const void* q, int64_t q_token_stride,
                             const void* kv_cache, int64_t num_blocks, const int32_t* block_tables,
                             int64_t table_stride, const int32_t* seq_lens, int64_t num_seqs,
                             int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                             int64_t block_size, float scale, int64_t window, float soft_cap) {
#define INFERD_DECODE(T)                                                                   \
  decode_attention<T>(static_cast<T*>(out), static_cast<const T*>(q), q_token_stride,      \
                      static_cast<const T*>(kv_cache), num_blocks, block_tables, table_stride, \
                      seq_lens, num_seqs, num_heads, num_kv_heads, head_dim, block_size, scale, \
                      window, soft_cap)
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
