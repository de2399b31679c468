// effx family: H2O heavy-hitter eviction, CPU operator implementations.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "h2o_args.h"

namespace effx {
namespace ops {
namespace {

std::tuple<at::Tensor, at::Tensor> h2o_attention_cpu(
    const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new, const at::Tensor& k_cache,
    const at::Tensor& v_cache, const at::Tensor& lengths, const std::optional<at::Tensor>& new_lengths,
    const std::optional<at::Tensor>& parents, const at::Tensor& scores, bool causal, double sm_scale) {
  constexpr const char* op = "h2o_attention";
  auto [c, kv] = prepare_dense_attention(op, q, k_new, v_new, k_cache, v_cache, lengths, new_lengths, parents,
                                         causal, sm_scale);
  attach_scores(op, c, scores, k_cache.size(2));
  cpu::dense_attention(c.args, kv, c.dtype, at::get_num_threads());
  return {c.out, c.lse};
}

void h2o_evict_cpu(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& scores,
                   const at::Tensor& positions, const at::Tensor& state, int64_t heavy, int64_t recent) {
  constexpr const char* op = "h2o_evict_";
  const H2OStorage s = h2o_storage(op, k_cache, v_cache, scores, positions, state, heavy, recent);
  cpu::h2o_evict(s, float_dtype(k_cache, op, "k_cache"), heavy, recent, at::get_num_threads());
}

}  // namespace

TORCH_LIBRARY_IMPL(effx, CPU, m) {
  m.impl("h2o_attention", &h2o_attention_cpu);
  m.impl("h2o_evict_", &h2o_evict_cpu);
}

}  // namespace ops
}  // namespace effx
