// effx family: H2O, checks (see h2o_args.h).
#include "h2o_args.h"

#include "checks.h"

namespace effx {
namespace ops {

void attach_scores(const char* op, AttentionCall& c, const at::Tensor& scores, int64_t capacity) {
  const AttentionArgs& a = c.args;
  check_storage(op, "scores", scores, {a.batch, a.kv_heads, capacity}, at::kFloat, c.q);
  // The kernel writes the new tokens' scores after the cached ones: both must fit.
  if (c.q.device().is_cpu()) {
    const int64_t* nl = c.new_lengths.defined() ? c.new_lengths.const_data_ptr<int64_t>() : nullptr;
    for (int64_t b = 0; b < a.batch; ++b) {
      const int64_t n = a.lengths[b * a.lengths_stride], added = nl ? nl[b] : a.q_len;
      EFFX_CHECK(n + added <= capacity, op, "lengths[", b, "] + new tokens (", n, " + ", added,
                 ") must not exceed the cache capacity (", capacity, ")");
    }
  }
  c.args.scores = scores.data_ptr<float>();
  c.args.scores_sb = scores.stride(0);
  c.args.scores_sh = scores.stride(1);
}

H2OStorage h2o_storage(const char* op, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& scores, const at::Tensor& positions, const at::Tensor& state,
                       int64_t heavy, int64_t recent) {
  EFFX_CHECK(k_cache.dim() == 4, op, "k_cache must be 4-D [batch, kv_heads, capacity, head_dim], got shape ",
             k_cache.sizes());
  const int64_t B = k_cache.size(0), H = k_cache.size(1), C = k_cache.size(2), D = k_cache.size(3);
  float_dtype(k_cache, op, "k_cache");
  EFFX_CHECK(heavy >= 0 && recent >= 0, op, "heavy and recent must be >= 0, got ", heavy, " and ", recent);
  EFFX_CHECK(heavy + recent <= C, op, "heavy + recent must not exceed the capacity (", C, "), got ", heavy + recent);
  check_storage(op, "v_cache", v_cache, k_cache.sizes(), k_cache.scalar_type(), k_cache);
  EFFX_CHECK(k_cache.is_contiguous(), op, "k_cache must be contiguous (it is cache storage)");
  check_storage(op, "scores", scores, {B, H, C}, at::kFloat, k_cache);
  check_storage(op, "positions", positions, {B, H, C}, at::kLong, k_cache);
  check_storage(op, "state", state, {B, 2}, at::kLong, k_cache);
  return H2OStorage{B, H, D, C, k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0), k_cache.stride(1),
                    k_cache.stride(2), scores.data_ptr<float>(), positions.data_ptr<int64_t>(),
                    state.data_ptr<int64_t>()};
}

}  // namespace ops
}  // namespace effx
