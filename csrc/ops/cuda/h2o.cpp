// effx family: H2O heavy-hitter eviction, CUDA operator implementations (host C++; kernels
// in csrc/kernels/cuda/h2o.cu).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"
#include "../h2o_args.h"
#include "attention_workspace.h"
#include "effx/h2o_cuda.h"

namespace effx {
namespace ops {
namespace {

std::tuple<at::Tensor, at::Tensor> h2o_attention_cuda(
    const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new, const at::Tensor& k_cache,
    const at::Tensor& v_cache, const at::Tensor& lengths, const std::optional<at::Tensor>& new_lengths,
    const std::optional<at::Tensor>& parents, const at::Tensor& scores, bool causal, double sm_scale) {
  constexpr const char* op = "h2o_attention";
  const c10::cuda::CUDAGuard guard(q.device());
  auto [c, kv] = prepare_dense_attention(op, q, k_new, v_new, k_cache, v_cache, lengths, new_lengths, parents,
                                         causal, sm_scale);
  attach_scores(op, c, scores, k_cache.size(2));
  const at::Tensor workspace = attention_workspace(op, c);
  const cudaError_t err =
      cuda::h2o_attention(c.args, kv, c.dtype, workspace.data_ptr(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "effx.h2o_attention: CUDA kernel failed: ", cudaGetErrorString(err));
  return {c.out, c.lse};
}

void h2o_evict_cuda(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& scores,
                    const at::Tensor& positions, const at::Tensor& state, int64_t heavy, int64_t recent) {
  constexpr const char* op = "h2o_evict_";
  const c10::cuda::CUDAGuard guard(k_cache.device());
  const H2OStorage s = h2o_storage(op, k_cache, v_cache, scores, positions, state, heavy, recent);
  const at::Tensor workspace = at::empty({static_cast<int64_t>(cuda::h2o_evict_workspace_bytes(s))},
                                         k_cache.options().dtype(at::kByte));
  const cudaError_t err = cuda::h2o_evict(s, float_dtype(k_cache, op, "k_cache"), heavy, recent,
                                          workspace.data_ptr(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "effx.h2o_evict_: CUDA kernel failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(effx, CUDA, m) {
  m.impl("h2o_attention", &h2o_attention_cuda);
  m.impl("h2o_evict_", &h2o_evict_cuda);
}

}  // namespace ops
}  // namespace effx
