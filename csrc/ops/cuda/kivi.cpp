// effx family: KIVI 2/4-bit KV cache, CUDA operator implementations (host C++; kernels in
// csrc/kernels/cuda/kivi.cu).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../attention_args.h"
#include "../checks.h"
#include "../kivi_args.h"
#include "attention_workspace.h"
#include "effx/kivi_cuda.h"

namespace effx {
namespace ops {
namespace {

std::tuple<at::Tensor, at::Tensor> kivi_attention_cuda(
    const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new, const at::Tensor& k_codes,
    const at::Tensor& k_scale, const at::Tensor& k_zero, const at::Tensor& v_codes,
    const at::Tensor& v_scale, const at::Tensor& v_zero, const at::Tensor& k_res,
    const at::Tensor& v_res, const at::Tensor& state, const std::optional<at::Tensor>& new_lengths,
    const std::optional<at::Tensor>& parents, int64_t bits, int64_t group_size, bool causal,
    double sm_scale, int64_t window) {
  constexpr const char* op = "kivi_attention";
  const c10::cuda::CUDAGuard guard(q.device());
  const KiviStorage s = kivi_storage(op, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_res,
                                     v_res, state, bits, group_size, q);
  AttentionCall c = prepare_attention(op, q, k_new, v_new, state.select(1, 0), new_lengths, parents,
                                      causal, sm_scale, s.capacity, window);
  EFFX_CHECK(c.args.kv_heads == s.heads && c.args.head_dim == s.head_dim && c.args.batch == s.batch, op,
             "k_new must have shape [", s.batch, ", ", s.heads, ", tokens, ", s.head_dim, "] like the cache, got ",
             k_new.sizes());
  const at::Tensor workspace = attention_workspace(op, c);
  const cudaError_t err =
      cuda::kivi_attention(c.args, s, c.dtype, workspace.data_ptr(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "effx.kivi_attention: CUDA kernel failed: ", cudaGetErrorString(err));
  return {c.out, c.lse};
}

void kivi_append_cuda(const at::Tensor& k_new, const at::Tensor& v_new, const at::Tensor& k_codes,
                      const at::Tensor& k_scale, const at::Tensor& k_zero, const at::Tensor& v_codes,
                      const at::Tensor& v_scale, const at::Tensor& v_zero, const at::Tensor& k_res,
                      const at::Tensor& v_res, const at::Tensor& state,
                      const std::optional<at::Tensor>& new_lengths, int64_t bits, int64_t group_size) {
  constexpr const char* op = "kivi_append_";
  const c10::cuda::CUDAGuard guard(k_res.device());
  const DType dtype = float_dtype(k_res, op, "k_res");
  const KiviStorage s = kivi_storage(op, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_res,
                                     v_res, state, bits, group_size, k_res);
  check_kivi_append(s, k_new, v_new, state, new_lengths, k_res);
  const at::Tensor kn = with_contiguous_rows(k_new), vn = with_contiguous_rows(v_new);
  const at::Tensor nl = new_lengths ? new_lengths->contiguous() : at::Tensor();
  const cudaError_t err = cuda::kivi_append(s, dtype, strided(kn), strided(vn), k_new.size(2),
                                            nl.defined() ? nl.const_data_ptr<int64_t>() : nullptr,
                                            c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "effx.kivi_append_: CUDA kernel failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(effx, CUDA, m) {
  m.impl("kivi_attention", &kivi_attention_cuda);
  m.impl("kivi_append_", &kivi_append_cuda);
}

}  // namespace ops
}  // namespace effx
