// effx: argument checks and output allocation shared by every cache-attention op (dense,
// KIVI) on both backends; see include/effx/attention.h for the semantics.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "effx/attention.h"

namespace effx {
namespace ops {

struct AttentionCall {
  AttentionArgs args;
  DType dtype;
  at::Tensor q, k_new, v_new, lengths, new_lengths, parents;  // kept alive for the kernel
  at::Tensor out, lse;
};

// Checks q [B, Hq, Tq, D], k_new / v_new [B, Hkv, Tq, D], lengths [B] (int64), optional
// new_lengths [B] and parents [Tq] or [B, Tq] (int64, parents[i] in [-1, i)), and the sliding
// `window` (0 for none; it needs causal attention without a tree); allocates out and lse.
// `capacity` bounds lengths when they are readable on the host.
AttentionCall prepare_attention(const char* op, const at::Tensor& q, const at::Tensor& k_new,
                                const at::Tensor& v_new, const at::Tensor& lengths,
                                const std::optional<at::Tensor>& new_lengths,
                                const std::optional<at::Tensor>& parents, bool causal,
                                double sm_scale, int64_t capacity, int64_t window = 0);

struct DenseAttentionCall {
  AttentionCall call;
  DenseKV kv;
};

// prepare_attention for a plain K/V cache pair [B, Hkv, capacity, D] (same strides for k and v,
// head_dim contiguous): the dense_attention and h2o_attention ops on both backends.
DenseAttentionCall prepare_dense_attention(const char* op, const at::Tensor& q, const at::Tensor& k_new,
                                           const at::Tensor& v_new, const at::Tensor& k_cache,
                                           const at::Tensor& v_cache, const at::Tensor& lengths,
                                           const std::optional<at::Tensor>& new_lengths,
                                           const std::optional<at::Tensor>& parents, bool causal,
                                           double sm_scale, int64_t window = 0);

// Strided view of a 4-D tensor whose last dim is contiguous.
Strided strided(const at::Tensor& t);

// A 4-D tensor with the given sizes, dtype and device, contiguous (cache storage).
void check_storage(const char* op, const char* arg, const at::Tensor& t,
                   at::IntArrayRef sizes, at::ScalarType dtype, const at::Tensor& like);

// t itself when its last dim is contiguous, else a contiguous copy.
at::Tensor with_contiguous_rows(const at::Tensor& t);

}  // namespace ops
}  // namespace effx
