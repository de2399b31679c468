// effx family: tree speculative decoding, CUDA operator implementations (host C++; kernels in
// csrc/kernels/cuda/spec.cu).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"
#include "../spec_args.h"
#include "effx/spec_cuda.h"

namespace effx {
namespace ops {
namespace {

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "effx.", op, ": CUDA kernel failed: ", cudaGetErrorString(err));
}

int64_t vocab_of(const char* op, const char* arg, const at::Tensor& t) {
  EFFX_CHECK(t.dim() == 3 && t.size(2) > 0, op, arg,
             " must be 3-D [batch, nodes + 1, vocab] with vocab >= 1, got shape ", t.sizes());
  return t.size(2);
}

at::Tensor sampling_probs_cuda(const at::Tensor& logits, double temperature, double top_p) {
  const c10::cuda::CUDAGuard guard(logits.device());
  ProbsCall c = prepare_sampling_probs(logits, temperature, top_p);
  check_launch(cuda::sampling_probs(c.logits.const_data_ptr(), c.dtype, c.rows, c.vocab,
                                    static_cast<float>(temperature), static_cast<float>(top_p),
                                    c.probs.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()),
               "sampling_probs");
  return c.probs;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tree_verify_greedy_cuda(const at::Tensor& tokens,
                                                                       const at::Tensor& parents,
                                                                       const at::Tensor& logits) {
  constexpr const char* op = "tree_verify_greedy";
  const c10::cuda::CUDAGuard guard(logits.device());
  const TreeCall c = prepare_tree(op, tokens, parents, vocab_of(op, "logits", logits));
  const DType dtype = float_dtype(logits, op, "logits");
  const at::Tensor x = node_rows(op, "logits", c, logits, logits.scalar_type());
  check_launch(cuda::verify_greedy(c.args, x.const_data_ptr(), dtype, c10::cuda::getCurrentCUDAStream()), op);
  return c.result();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tree_verify_match_cuda(const at::Tensor& tokens,
                                                                      const at::Tensor& parents,
                                                                      const at::Tensor& target_tokens) {
  constexpr const char* op = "tree_verify_match";
  const c10::cuda::CUDAGuard guard(tokens.device());
  const TreeCall c = prepare_tree(op, tokens, parents, 0);
  const at::Tensor t = node_values(op, "target_tokens", c, target_tokens, at::kLong);
  check_launch(cuda::verify_match(c.args, t.const_data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream()), op);
  return c.result();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tree_verify_sample_cuda(const at::Tensor& tokens,
                                                                       const at::Tensor& parents,
                                                                       const at::Tensor& target_probs,
                                                                       const at::Tensor& draft_probs,
                                                                       const at::Tensor& uniforms) {
  constexpr const char* op = "tree_verify_sample";
  const c10::cuda::CUDAGuard guard(tokens.device());
  const TreeCall c = prepare_tree(op, tokens, parents, vocab_of(op, "target_probs", target_probs));
  const at::Tensor p = node_rows(op, "target_probs", c, target_probs, at::kFloat);
  const at::Tensor q = node_rows(op, "draft_probs", c, draft_probs, at::kFloat);
  const at::Tensor u = node_values(op, "uniforms", c, uniforms, at::kFloat);
  const at::Tensor workspace = at::empty({static_cast<int64_t>(cuda::verify_sample_workspace_bytes(c.args))},
                                         tokens.options().dtype(at::kByte));
  check_launch(cuda::verify_sample(c.args, p.const_data_ptr<float>(), q.const_data_ptr<float>(),
                                   u.const_data_ptr<float>(), workspace.data_ptr(),
                                   c10::cuda::getCurrentCUDAStream()),
               op);
  return c.result();
}

}  // namespace

TORCH_LIBRARY_IMPL(effx, CUDA, m) {
  m.impl("sampling_probs", &sampling_probs_cuda);
  m.impl("tree_verify_greedy", &tree_verify_greedy_cuda);
  m.impl("tree_verify_match", &tree_verify_match_cuda);
  m.impl("tree_verify_sample", &tree_verify_sample_cuda);
}

}  // namespace ops
}  // namespace effx
