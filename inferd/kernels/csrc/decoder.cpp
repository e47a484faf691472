// A whole decode step's decoder layers in one call, for Llama-family models whose linears all
// have GGUF 4-bit blocks (inferd/models/layers/fused_decode.py decides when it applies).
//
// Why: a decode step of a few sequences is ~12 small ops per layer; from Python each costs
// 10-30 us of interpreter and wrapper time on this CPU, about as much as the arithmetic. Here
// the same kernels run back to back with no Python between them. Per layer, for T tokens
// (one new token per sequence):
//   h = RMSNorm(x + residual)          residual <- x + residual   (layer 0: residual <- x)
//   qkv = h Wqkv^T (+ b)               [q/k per-head RMSNorm (Qwen3)]   RoPE on q, k
//   K/V -> cache at the token slots;   a = attention(q, cached K/V)
//   h = RMSNorm(a Wo^T + residual)     residual <- a Wo^T + residual
//   x = act(h Wgate^T) * (h Wup^T)  Wdown^T
// x and residual come back as the stream after the last layer; the final norm and the LM head
// stay in Python. Every op is the same kernel the layer-by-layer path calls, so both paths give
// the same bits.
#include "api.h"
#include "common.h"

namespace {

struct Q4Ref {  // a linear layer's 4-bit blocks (quant.Q4Weights) and optional bf16 bias
  const uint8_t* qs;
  const float* d;
  const float* m;
  const uint8_t* tq;  // the same blocks as quant.Q4Tiles (null with AMX, which never reads them)
  const float* td;
  const float* tm;
  const void* bias;
  int64_t n, k;
};

struct LayerRef {
  const void* input_norm;  // bf16 [hidden]
  const void* post_norm;   // bf16 [hidden]
  const void* q_norm;      // bf16 [head_dim] or null
  const void* k_norm;
  Q4Ref qkv, o, gate_up, down;
  void* kv_cache;  // bf16 [2, num_blocks, block_size, kv_heads, head_dim]
  int64_t num_blocks;
  int64_t window;  // sliding window, 0 = none
};

struct StepRef {
  int64_t tokens, hidden, heads, kv_heads, head_dim, intermediate;
  int64_t block_size, table_stride, act, use_amx, skinny_max_rows;
  float eps, scale;
  const void* cos;  // bf16 [tokens, head_dim]
  const void* sin;
  const int64_t* slots;         // [tokens]
  const int32_t* block_tables;  // [tokens, table_stride]
  const int32_t* seq_lens;      // [tokens]
};

constexpr int kBF16 = 1;

// The same choice as Linear._small_m: the skinny kernel for a few rows, else kernels.gemm_q4's
// (AMX tiles, or AVX512-BF16 on the regrouped blocks).
void linear(const Q4Ref& w, void* y, const void* x, int64_t rows, const StepRef& s) {
  if (rows <= s.skinny_max_rows)
    inferd_gemv_q4(y, 0, w.n, x, w.k, w.qs, w.d, w.m, w.bias, rows, w.n, w.k);
  else if (s.use_amx)
    inferd_gemm_q4_amx(y, w.n, x, w.k, w.qs, w.d, w.m, w.bias, rows, w.n, w.k);
  else
    inferd_gemm_q4_avx512(y, w.n, x, w.k, w.tq, w.td, w.tm, w.bias, rows, w.n, w.k);
}

}  // namespace

extern "C" {

// x [tokens, hidden] bf16: the embeddings in, the last layer's output out; residual [tokens,
// hidden] bf16, written (layer 0 copies x into it). The caller checked every pointer, shape
// and index (fused_decode.py).
void inferd_decoder_layers(const LayerRef* layers, int64_t num_layers, const StepRef* s, void* x,
                           void* residual) {
  const int64_t T = s->tokens, H = s->heads, Hkv = s->kv_heads, D = s->head_dim;
  const int64_t qkv_n = (H + 2 * Hkv) * D, hidden = s->hidden;
  std::vector<uint16_t> h(T * hidden), qkv(T * qkv_n), attn(T * H * D), o(T * hidden),
      gu(T * 2 * s->intermediate), act(T * s->intermediate);
  for (int64_t l = 0; l < num_layers; ++l) {
    const LayerRef& L = layers[l];
    if (l == 0) {
      std::memcpy(residual, x, T * hidden * 2);
      inferd_rms_norm(kBF16, h.data(), hidden, x, hidden, nullptr, hidden, L.input_norm, T,
                      hidden, s->eps, 0);
    } else {
      inferd_rms_norm(kBF16, h.data(), hidden, x, hidden, residual, hidden, L.input_norm, T,
                      hidden, s->eps, 0);
    }
    linear(L.qkv, qkv.data(), h.data(), T, *s);
    if (L.q_norm) {  // per-head norms: each token's heads are rows of head_dim
      for (int64_t t = 0; t < T; ++t) {
        uint16_t* q = qkv.data() + t * qkv_n;
        inferd_rms_norm(kBF16, q, D, q, D, nullptr, D, L.q_norm, H, D, s->eps, 0);
        inferd_rms_norm(kBF16, q + H * D, D, q + H * D, D, nullptr, D, L.k_norm, Hkv, D, s->eps, 0);
      }
    }
    inferd_rotary(kBF16, qkv.data(), qkv_n, T, H + Hkv, D, s->cos, s->sin);
    inferd_write_kv(kBF16, L.kv_cache, L.num_blocks * s->block_size, qkv.data() + H * D, qkv_n,
                    qkv.data() + (H + Hkv) * D, qkv_n, s->slots, T, Hkv * D);
    inferd_decode_attention(kBF16, attn.data(), qkv.data(), qkv_n, L.kv_cache, L.num_blocks,
                            s->block_tables, s->table_stride, s->seq_lens, T, H, Hkv, D,
                            s->block_size, s->scale, L.window, 0.f, s->use_amx);
    linear(L.o, o.data(), attn.data(), T, *s);
    inferd_rms_norm(kBF16, h.data(), hidden, o.data(), hidden, residual, hidden, L.post_norm, T,
                    hidden, s->eps, 0);
    linear(L.gate_up, gu.data(), h.data(), T, *s);
    inferd_act_and_mul(kBF16, act.data(), gu.data(), T, s->intermediate, static_cast<int>(s->act));
    linear(L.down, x, act.data(), T, *s);
  }
}

}  // extern "C"
