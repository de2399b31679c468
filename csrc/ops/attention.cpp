// effx: fused attention over a plain (dense) KV cache, CPU operator implementation.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "attention_args.h"

namespace effx {
namespace ops {
namespace {

std::tuple<at::Tensor, at::Tensor> dense_attention_cpu(
    const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new, const at::Tensor& k_cache,
    const at::Tensor& v_cache, const at::Tensor& lengths, const std::optional<at::Tensor>& new_lengths,
    const std::optional<at::Tensor>& parents, bool causal, double sm_scale, int64_t window) {
  auto [c, kv] = prepare_dense_attention("dense_attention", q, k_new, v_new, k_cache, v_cache, lengths,
                                         new_lengths, parents, causal, sm_scale, window);
  cpu::dense_attention(c.args, kv, c.dtype, at::get_num_threads());
  return {c.out, c.lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(effx, CPU, m) { m.impl("dense_attention", &dense_attention_cpu); }

}  // namespace ops
}  // namespace effx
