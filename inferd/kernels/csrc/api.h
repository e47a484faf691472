// The C entry points of inferd's CPU kernels: what inferd/kernels/cpu.py calls through ctypes
// (its _SIGNATURES must match) and what decoder.cpp composes. Every .cpp includes this, so the
// compiler checks each definition against its declaration here.
#pragma once
#include <cstdint>

extern "C" {
int inferd_abi_version();
void inferd_argmax_f32(const float* x, int64_t rows, int64_t cols, int64_t* out);
void inferd_rms_norm(int dtype, void* out, int64_t out_stride, const void* x, int64_t x_stride,
                     void* residual, int64_t res_stride, const void* weight, int64_t rows,
                     int64_t dim, float eps, int gemma);
void inferd_rotary(int dtype, void* x, int64_t x_stride, int64_t tokens, int64_t heads,
                   int64_t dim, const void* cos, const void* sin);
void inferd_act_and_mul(int dtype, void* out, const void* x, int64_t rows, int64_t n, int act);
void inferd_decode_attention(int dtype, void* out, const void* q, int64_t q_token_stride,
                             const void* kv_cache, int64_t num_blocks, const int32_t* block_tables,
                             int64_t table_stride, const int32_t* seq_lens, int64_t num_seqs,
                             int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                             int64_t block_size, float scale, int64_t window, float soft_cap,
                             int64_t use_amx);
void inferd_write_kv(int dtype, void* kv_cache, int64_t num_slots, const void* k, int64_t k_stride,
                     const void* v, int64_t v_stride, const int64_t* slots, int64_t num_tokens,
                     int64_t row);
int inferd_has_gemv_bf16();
void inferd_gemv_bf16(void* y, int y_is_f32, int64_t ldy, const void* x, int64_t ldx,
                      const void* w, const void* bias, int64_t M, int64_t N, int64_t K);
void inferd_gemv_q4(void* y, int y_is_f32, int64_t ldy, const void* x, int64_t ldx,
                    const uint8_t* qs, const float* d, const float* m, const void* bias, int64_t M,
                    int64_t N, int64_t K);
void inferd_gemv_q8(void* y, int y_is_f32, int64_t ldy, const void* x, int64_t ldx,
                    const int8_t* qs, const float* d, const void* bias, int64_t M, int64_t N,
                    int64_t K);
void inferd_prefill_attention(void* out, int64_t out_stride, const void* q, int64_t q_stride,
                              const void* kv_cache, int64_t num_blocks, const int32_t* block_tables,
                              int64_t table_stride, const int32_t* seq_lens,
                              const int32_t* query_start, int64_t first, int64_t num_seqs,
                              int64_t heads, int64_t kv_heads, int64_t head_dim,
                              int64_t block_size, float scale, int64_t window, int64_t use_amx);
int inferd_amx_init();
void inferd_gemm_q4_amx(void* y, int64_t ldy, const void* x, int64_t ldx, const uint8_t* qs,
                        const float* d, const float* m, const void* bias, int64_t M, int64_t N,
                        int64_t K);
void inferd_gemm_q4_avx512(void* y, int64_t ldy, const void* x, int64_t ldx, const uint8_t* tq,
                           const float* td, const float* tm, const void* bias, int64_t M,
                           int64_t N, int64_t K);
}
