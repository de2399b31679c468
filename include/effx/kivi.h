// effx family: KIVI 2/4-bit KV cache (SPECS.md section 2), torch-free API.
//
// Storage of one layer, all contiguous, capacity C tokens, residual R, group G, b bits:
//   k_codes [B, H, D, C*b/32] int32  keys per CHANNEL: a group is G consecutive tokens of one
//   k_scale, k_zero [B, H, D, C/G]   channel, packed along tokens (include/effx/quant.h)
//   v_codes [B, H, C, D*b/32] int32  values per TOKEN: a group is G consecutive channels
//   v_scale, v_zero [B, H, C, D/G]
//   k_res [B, H, D, R]  full-precision key residual, channel-major, token t in column t % R
//   v_res [B, H, R, D]  full-precision value residual, token t in row t % R
//   state [B, 3] int64: per row (n tokens, kq keys quantized, vq values quantized)
// Keys [0, kq) are quantized and [kq, n) are in k_res (kq a multiple of R, n - kq < R after an
// append); values [0, vq) are quantized and [vq, n) are in v_res (n - vq <= R). Appending
// follows the residual rule of SPECS.md: each new token enters both residuals; keys are
// quantized in a whole block of R once R have gathered, values one token at a time, oldest
// first, while more than R are held. Without crops that is kq = n - n % R, vq = max(0, n - R);
// a crop back to any n >= max(kq, vq) keeps the state exact. Requires G | D, G | R, G | C and
// G * b % 32 == 0.
#pragma once

#include <cstdint>

#include "effx/attention.h"

namespace effx {

struct KiviStorage {
  int64_t batch, heads, head_dim, capacity, residual;
  int bits, group_size;
  int32_t* k_codes;
  void* k_scale;
  void* k_zero;
  int32_t* v_codes;
  void* v_scale;
  void* v_zero;
  void* k_res;
  void* v_res;
  int64_t* state;
};

namespace cpu {

// Attention over [quantized ++ residual ++ new] tokens (AttentionArgs in attention.h; its
// lengths must be column 0 of the state).
void kivi_attention(const AttentionArgs& a, const KiviStorage& s, DType dtype, int num_threads);

// Appends new tokens k_new, v_new [B, H, new_len, D] (row b: its first new_lengths[b], or
// all new_len when new_lengths is null), quantizing what leaves the residual windows, and
// advances the state.
void kivi_append(const KiviStorage& s, DType dtype, const Strided& k_new, const Strided& v_new,
                 int64_t new_len, const int64_t* new_lengths, int num_threads);

}  // namespace cpu
}  // namespace effx
