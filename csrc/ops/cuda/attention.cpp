// effx: fused attention over a plain (dense) KV cache, CUDA operator implementation (host
// C++; kernels in csrc/kernels/cuda/attention.cu).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "attention_workspace.h"

namespace effx {
namespace ops {
namespace {

std::tuple<at::Tensor, at::Tensor> dense_attention_cuda(
    const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new, const at::Tensor& k_cache,
    const at::Tensor& v_cache, const at::Tensor& lengths, const std::optional<at::Tensor>& new_lengths,
    const std::optional<at::Tensor>& parents, bool causal, double sm_scale, int64_t window) {
  constexpr const char* op = "dense_attention";
  const c10::cuda::CUDAGuard guard(q.device());
  auto [c, kv] = prepare_dense_attention(op, q, k_new, v_new, k_cache, v_cache, lengths, new_lengths, parents,
                                         causal, sm_scale, window);
  const at::Tensor workspace = attention_workspace(op, c);
  const cudaError_t err = cuda::dense_attention(c.args, kv, c.dtype, workspace.data_ptr(),
                                                c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "effx.dense_attention: CUDA kernel failed: ", cudaGetErrorString(err));
  return {c.out, c.lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(effx, CUDA, m) { m.impl("dense_attention", &dense_attention_cuda); }

}  // namespace ops
}  // namespace effx
