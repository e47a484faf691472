// CPU kernels for the engine's hot path, built on first use by inferd/kernels/cpu.py with the
// host compiler (-O3 -march=native -fopenmp) and called through ctypes with raw pointers.
//
// Why hand-written: torch has no paged attention on CPU. Its decode path had to gather every
// sequence's K/V into a padded copy and run a masked SDPA whose CPU kernel is tuned for long
// queries, not for one query per sequence; at 64 sequences that was half of a step.
//
// Contract (the Python side checks it before every call): tensors are contiguous in the
// dimensions the comments name, pointers are valid for the extents given, element types are
// float32, bfloat16 or float16 (dtype codes below) and match across a call. OpenMP here is the
// same libgomp instance torch loaded (same soname), so torch.set_num_threads applies.
#include <omp.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

enum DType : int { F32 = 0, BF16 = 1, F16 = 2 };

struct bf16 {
  uint16_t bits;
};

inline float to_float(float x) { return x; }
inline float to_float(bf16 x) {
  uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float to_float(_Float16 x) { return static_cast<float>(x); }

template <typename T>
T from_float(float f);
template <>
inline float from_float<float>(float f) { return f; }
template <>
inline bf16 from_float<bf16>(float f) {  // round to nearest even, as torch does
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{static_cast<uint16_t>((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{static_cast<uint16_t>(u >> 16)};
}
template <>
inline _Float16 from_float<_Float16>(float f) { return static_cast<_Float16>(f); }

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

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const bf16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline __m512 load16(const _Float16* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// e^x for x <= 0 (softmax after subtracting the max): 2^n * p(r), r = x - n ln2 in
// [-ln2/2, ln2/2], degree-6 polynomial (Cephes' expf coefficients), relative error ~2e-7.
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

// Softmax numerators in place (x - max, exponentiated); returns their sum.
inline float exp_shift_sum(float* x, int64_t n, float m) {
  const __m512 mv = _mm512_set1_ps(m);
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(x + i), mv));
    _mm512_storeu_ps(x + i, e);
    acc = _mm512_add_ps(acc, e);
  }
  if (i < n) {
    const __mmask16 k = static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), mv));
    _mm512_mask_storeu_ps(x + i, k, e);
    acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(k, e));
  }
  return _mm512_reduce_add_ps(acc);
}

// One (sequence, KV head) with head_dim = 16 * NC: each query head's q stays in NC registers
// while the head's keys stream past (they stay in L1/L2 for the next query head of the group).
template <typename T, int NC>
void decode_head_avx512(T* out, const T* q, const T* k_cache, const T* v_cache,
                        const int32_t* table, int64_t start, int64_t end, int64_t row,
                        int64_t head_offset, int64_t block_size, int64_t groups, float scale,
                        float soft_cap, std::vector<float>& scores) {
  constexpr int64_t D = 16 * NC;
  const int64_t L = end - start;
  const float pre = soft_cap > 0 ? scale / soft_cap : scale;
  scores.resize(L);
  for (int64_t g = 0; g < groups; ++g) {
    __m512 qv[NC];
    for (int c = 0; c < NC; ++c) qv[c] = _mm512_mul_ps(load16(q + g * D + 16 * c), _mm512_set1_ps(pre));
    float* s = scores.data();
    float m = -std::numeric_limits<float>::infinity();
    for_each_token(k_cache, table, start, end, block_size, row, head_offset,
                   [&](int64_t t, const T* kr) {
                     __m512 a = _mm512_mul_ps(qv[0], load16(kr));
                     for (int c = 1; c < NC; ++c) a = _mm512_fmadd_ps(qv[c], load16(kr + 16 * c), a);
                     float x = _mm512_reduce_add_ps(a);
                     if (soft_cap > 0) x = std::tanh(x) * soft_cap;
                     s[t] = x;
                     m = std::max(m, x);
                   });
    const float inv = 1.f / exp_shift_sum(s, L, m);
    __m512 acc[NC];
    for (int c = 0; c < NC; ++c) acc[c] = _mm512_setzero_ps();
    for_each_token(v_cache, table, start, end, block_size, row, head_offset,
                   [&](int64_t t, const T* vr) {
                     const __m512 p = _mm512_set1_ps(s[t]);
                     for (int c = 0; c < NC; ++c) acc[c] = _mm512_fmadd_ps(p, load16(vr + 16 * c), acc[c]);
                   });
    alignas(64) float tmp[D];
    for (int c = 0; c < NC; ++c) _mm512_store_ps(tmp + 16 * c, _mm512_mul_ps(acc[c], _mm512_set1_ps(inv)));
    for (int64_t d = 0; d < D; ++d) out[g * D + d] = from_float<T>(tmp[d]);
  }
}
#endif

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

template <typename T>
void decode_attention(T* out, const T* q, int64_t q_token_stride, const T* kv_cache,
                      int64_t num_blocks, const int32_t* block_tables, int64_t table_stride,
                      const int32_t* seq_lens, int64_t num_seqs, int64_t num_heads,
                      int64_t num_kv_heads, int64_t head_dim, int64_t block_size, float scale,
                      int64_t window, float soft_cap) {
  const int64_t groups = num_heads / num_kv_heads;
  const T* k_cache = kv_cache;
  const T* v_cache = kv_cache + num_blocks * block_size * num_kv_heads * head_dim;
  const int64_t work = num_seqs * num_kv_heads;
  const int64_t row = num_kv_heads * head_dim;  // elements between tokens inside a block
#pragma omp parallel
  {
    std::vector<float> scores, acc;
#pragma omp for schedule(dynamic, 1)
    for (int64_t w = 0; w < work; ++w) {
      const int64_t b = w / num_kv_heads, kvh = w % num_kv_heads;
      const int64_t h0 = kvh * groups, len = seq_lens[b];
      const int64_t start = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      T* o = out + (b * num_heads + h0) * head_dim;
      const T* qh = q + b * q_token_stride + h0 * head_dim;
      const int32_t* table = block_tables + b * table_stride;
      const int64_t ho = kvh * head_dim;
#if defined(__AVX512F__)
#define INFERD_HEAD(NC)                                                                        \
  decode_head_avx512<T, NC>(o, qh, k_cache, v_cache, table, start, len, row, ho, block_size, \
                            groups, scale, soft_cap, scores)
      switch (head_dim) {
        case 32: INFERD_HEAD(2); continue;
        case 64: INFERD_HEAD(4); continue;
        case 80: INFERD_HEAD(5); continue;
        case 96: INFERD_HEAD(6); continue;
        case 128: INFERD_HEAD(8); continue;
        case 256: INFERD_HEAD(16); continue;
        default: break;
      }
#undef INFERD_HEAD
#endif
      decode_head_generic<T>(o, qh, k_cache, v_cache, table, start, len, row, ho, block_size,
                             groups, head_dim, scale, soft_cap, scores, acc);
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

// torch's argmax semantics: the first maximum wins, a NaN counts as the maximum (the first
// NaN), and a row of -inf gives 0.
inline int64_t argmax_row(const float* row, int64_t cols) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t c = 0;
#if defined(__AVX512F__)
  __m512 mv = _mm512_set1_ps(m);
  __mmask16 nan = 0;
  for (; c + 16 <= cols; c += 16) {
    const __m512 v = _mm512_loadu_ps(row + c);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    mv = _mm512_max_ps(mv, v);
  }
  m = _mm512_reduce_max_ps(mv);
  if (nan) m = std::numeric_limits<float>::quiet_NaN();
#endif
  for (; c < cols; ++c) {
    if (row[c] != row[c]) m = row[c];
    else if (!(m != m)) m = std::max(m, row[c]);
  }
  int64_t idx = 0;
  if (m != m) {
    while (row[idx] == row[idx]) ++idx;
  } else {
    while (idx < cols && row[idx] != m) ++idx;
    if (idx == cols) idx = 0;
  }
  return idx;
}

}  // namespace

extern "C" {

int inferd_abi_version() { return 1; }

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

// Row-wise argmax of float32 [rows, cols] (contiguous) into int64 [rows], torch's semantics:
// the first maximum wins, and a NaN counts as the maximum (the first NaN).
void inferd_argmax_f32(const float* x, int64_t rows, int64_t cols, int64_t* out) {
#pragma omp parallel for schedule(static) if (rows > 1)
  for (int64_t r = 0; r < rows; ++r) out[r] = argmax_row(x + r * cols, cols);
}

}  // extern "C"
