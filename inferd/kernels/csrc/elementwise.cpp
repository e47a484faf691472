// Row-wise kernels of the decoder layers and the sampler: argmax, RMSNorm (with the residual
// add fused in), rotary embeddings, gated activations. Each reproduces torch's rounding for
// 16-bit types step by step (compute in fp32, round where torch's eager ops round), so the
// fused op gives the same bits as the op sequence it replaces, up to fp32 reduction order.
#include "api.h"
#include "common.h"

#include <type_traits>

namespace inferd {
namespace {

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


// One row of RMSNorm. With a residual: r = x + residual, rounded to T, is stored back into the
// residual (the stream the next layer adds to) and normalised. Llama: w * round(r * inv);
// Gemma: round(r * inv * (1 + w)), rounded once (HF's GemmaRMSNorm works in fp32 throughout).
template <typename T>
void rms_norm_row(T* out, const T* x, T* residual, const T* w, int64_t dim, float eps,
                  bool gemma, std::vector<float>& buf) {
  buf.resize(dim);
  float* r = buf.data();
  T* tag = nullptr;
  float ss = 0.f;
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= dim; i += 16) {
    __m512 v = load16(x + i);
    if (residual) {
      v = round_to(tag, _mm512_add_ps(v, load16(residual + i)));
      store16(residual + i, v);
    }
    _mm512_storeu_ps(r + i, v);
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  ss = _mm512_reduce_add_ps(acc);
#endif
  for (; i < dim; ++i) {
    float v = to_float(x[i]);
    if (residual) {
      const T sum = from_float<T>(v + to_float(residual[i]));
      residual[i] = sum;
      v = to_float(sum);
    }
    r[i] = v;
    ss += v * v;
  }
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(dim) + eps);
  i = 0;
#if defined(__AVX512F__)
  const __m512 iv = _mm512_set1_ps(inv), one = _mm512_set1_ps(1.f);
  for (; i + 16 <= dim; i += 16) {
    const __m512 n = _mm512_mul_ps(_mm512_loadu_ps(r + i), iv);
    const __m512 wv = load16(w + i);
    store16(out + i, gemma ? _mm512_mul_ps(n, _mm512_add_ps(one, wv))
                           : _mm512_mul_ps(wv, round_to(tag, n)));
  }
#endif
  for (; i < dim; ++i) {
    const float n = r[i] * inv;
    out[i] = gemma ? from_float<T>(n * (1.f + to_float(w[i])))
                   : from_float<T>(to_float(w[i]) * to_float(from_float<T>(n)));
  }
}

// Rotate-half RoPE in place on one head: x = [a | b] -> [a c1 - b s1 | b c2 + a s2] with the
// sign folded into sin ([-s | s]), each product and the sum rounded to T as torch rounds
// `x * cos + rotate_half(x) * sin`.
template <typename T>
void rotary_head(T* x, const T* cos, const T* sin, int64_t dim) {
  const int64_t half = dim / 2;
  T* tag = nullptr;
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= half; i += 16) {
    const __m512 a = load16(x + i), b = load16(x + half + i);
    const __m512 lo = _mm512_add_ps(round_to(tag, _mm512_mul_ps(a, load16(cos + i))),
                                    round_to(tag, _mm512_mul_ps(b, load16(sin + i))));
    const __m512 hi = _mm512_add_ps(round_to(tag, _mm512_mul_ps(b, load16(cos + half + i))),
                                    round_to(tag, _mm512_mul_ps(a, load16(sin + half + i))));
    store16(x + i, lo);
    store16(x + half + i, hi);
  }
#endif
  for (; i < half; ++i) {
    const float a = to_float(x[i]), b = to_float(x[half + i]);
    auto rnd = [](float v) { return to_float(from_float<T>(v)); };
    x[i] = from_float<T>(rnd(a * to_float(cos[i])) + rnd(b * to_float(sin[i])));
    x[half + i] = from_float<T>(rnd(b * to_float(cos[half + i])) + rnd(a * to_float(sin[half + i])));
  }
}

enum Act : int { SILU = 0, GELU_TANH = 1 };

// GELU, tanh form: 0.5 g (1 + tanh y), y = sqrt(2/pi) (g + 0.044715 g^3), written as torch
// writes it. 1 + tanh y cancels near y << 0; torch's result carries that cancellation (and is
// exactly 0 once tanh rounds to -1), so this does too rather than be more accurate than it.
inline float act_scalar(float g, int act) {
  if (act == SILU) return g / (1.f + std::exp(-g));
  const float y = 0.7978845608028654f * (g + 0.044715f * (g * g * g));
  return 0.5f * g * (1.f + std::tanh(y));
}

#if defined(__AVX512F__)
inline __m512 act512(__m512 g, int act) {
  const __m512 one = _mm512_set1_ps(1.f);
  if (act == SILU) return _mm512_div_ps(g, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
  const __m512 g3 = _mm512_mul_ps(_mm512_mul_ps(g, g), g);
  const __m512 y = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f),
                                 _mm512_add_ps(g, _mm512_mul_ps(_mm512_set1_ps(0.044715f), g3)));
  // tanh |y| = 1 - 2 / (e^{2|y|} + 1): rounds to exactly 1 where torch's tanh does
  const __m512 ay = _mm512_abs_ps(y);
  const __m512 e = exp512(_mm512_add_ps(ay, ay));
  __m512 th = _mm512_sub_ps(one, _mm512_div_ps(_mm512_set1_ps(2.f), _mm512_add_ps(e, one)));
  th = _mm512_mask_sub_ps(th, _mm512_cmp_ps_mask(y, _mm512_setzero_ps(), _CMP_LT_OQ),
                          _mm512_setzero_ps(), th);
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), g), _mm512_add_ps(one, th));
}
#endif

// out = round(round(act(gate)) * up) for one row of a fused [gate | up] projection.
template <typename T>
void act_and_mul_row(T* out, const T* gate, const T* up, int64_t n, int act) {
  T* tag = nullptr;
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16)
    store16(out + i, _mm512_mul_ps(round_to(tag, act512(load16(gate + i), act)), load16(up + i)));
#endif
  for (; i < n; ++i)
    out[i] = from_float<T>(to_float(from_float<T>(act_scalar(to_float(gate[i]), act))) *
                           to_float(up[i]));
}

}  // namespace
}  // namespace inferd

using namespace inferd;

extern "C" {

int inferd_abi_version() { return 3; }

// Row-wise argmax of float32 [rows, cols] (contiguous) into int64 [rows], torch's semantics:
// the first maximum wins, and a NaN counts as the maximum (the first NaN).
void inferd_argmax_f32(const float* x, int64_t rows, int64_t cols, int64_t* out) {
#pragma omp parallel for schedule(static) if (rows > 1)
  for (int64_t r = 0; r < rows; ++r) out[r] = argmax_row(x + r * cols, cols);
}

}  // extern "C"

extern "C" {

// out [rows, dim] (row stride out_stride) <- RMSNorm of x [rows, dim] (x_stride); residual
// [rows, dim] (res_stride) or null, updated in place to x + residual; weight [dim].
void inferd_rms_norm(int dtype, void* out, int64_t out_stride, const void* x, int64_t x_stride,
                     void* residual, int64_t res_stride, const void* weight, int64_t rows,
                     int64_t dim, float eps, int gemma) {
  dispatch(dtype, [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
#pragma omp parallel if (rows * dim >= 16384)
    {
      std::vector<float> buf;
#pragma omp for schedule(static)
      for (int64_t r = 0; r < rows; ++r)
        rms_norm_row<T>(static_cast<T*>(out) + r * out_stride,
                        static_cast<const T*>(x) + r * x_stride,
                        residual ? static_cast<T*>(residual) + r * res_stride : nullptr,
                        static_cast<const T*>(weight), dim, eps, gemma != 0, buf);
    }
  });
}

// x [tokens, heads, dim] with token stride x_stride (heads packed), rotated in place by
// cos/sin [tokens, dim] (contiguous, in x's dtype).
void inferd_rotary(int dtype, void* x, int64_t x_stride, int64_t tokens, int64_t heads,
                   int64_t dim, const void* cos, const void* sin) {
  dispatch(dtype, [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
#pragma omp parallel for schedule(static) if (tokens * heads * dim >= 16384)
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t h = 0; h < heads; ++h)
        rotary_head<T>(static_cast<T*>(x) + t * x_stride + h * dim,
                       static_cast<const T*>(cos) + t * dim, static_cast<const T*>(sin) + t * dim,
                       dim);
  });
}

// out [rows, n] contiguous <- act(x[:, :n]) * x[:, n:] for x [rows, 2n] contiguous.
void inferd_act_and_mul(int dtype, void* out, const void* x, int64_t rows, int64_t n, int act) {
  dispatch(dtype, [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
#pragma omp parallel for schedule(static) if (rows * n >= 16384)
    for (int64_t r = 0; r < rows; ++r) {
      const T* row = static_cast<const T*>(x) + r * 2 * n;
      act_and_mul_row<T>(static_cast<T*>(out) + r * n, row, row + n, n, act);
    }
  });
}

}  // extern "C"
