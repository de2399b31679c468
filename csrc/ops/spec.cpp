// effx family: tree speculative decoding, CPU operator implementations.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "spec_args.h"

namespace effx {
namespace ops {
namespace {

int64_t vocab_of(const char* op, const char* arg, const at::Tensor& t) {
  EFFX_CHECK(t.dim() == 3 && t.size(2) > 0, op, arg,
             " must be 3-D [batch, nodes + 1, vocab] with vocab >= 1, got shape ", t.sizes());
  return t.size(2);
}

at::Tensor sampling_probs_cpu(const at::Tensor& logits, double temperature, double top_p) {
  ProbsCall c = prepare_sampling_probs(logits, temperature, top_p);
  cpu::sampling_probs(c.logits.const_data_ptr(), c.dtype, c.rows, c.vocab, static_cast<float>(temperature),
                      static_cast<float>(top_p), c.probs.data_ptr<float>(), at::get_num_threads());
  return c.probs;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tree_verify_greedy_cpu(const at::Tensor& tokens,
                                                                      const at::Tensor& parents,
                                                                      const at::Tensor& logits) {
  constexpr const char* op = "tree_verify_greedy";
  const TreeCall c = prepare_tree(op, tokens, parents, vocab_of(op, "logits", logits));
  const DType dtype = float_dtype(logits, op, "logits");
  const at::Tensor x = node_rows(op, "logits", c, logits, logits.scalar_type());
  cpu::verify_greedy(c.args, x.const_data_ptr(), dtype, at::get_num_threads());
  return c.result();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tree_verify_match_cpu(const at::Tensor& tokens,
                                                                     const at::Tensor& parents,
                                                                     const at::Tensor& target_tokens) {
  constexpr const char* op = "tree_verify_match";
  const TreeCall c = prepare_tree(op, tokens, parents, 0);
  const at::Tensor t = node_values(op, "target_tokens", c, target_tokens, at::kLong);
  cpu::verify_match(c.args, t.const_data_ptr<int64_t>(), at::get_num_threads());
  return c.result();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tree_verify_sample_cpu(const at::Tensor& tokens,
                                                                      const at::Tensor& parents,
                                                                      const at::Tensor& target_probs,
                                                                      const at::Tensor& draft_probs,
                                                                      const at::Tensor& uniforms) {
  constexpr const char* op = "tree_verify_sample";
  const TreeCall c = prepare_tree(op, tokens, parents, vocab_of(op, "target_probs", target_probs));
  const at::Tensor p = node_rows(op, "target_probs", c, target_probs, at::kFloat);
  const at::Tensor q = node_rows(op, "draft_probs", c, draft_probs, at::kFloat);
  const at::Tensor u = node_values(op, "uniforms", c, uniforms, at::kFloat);
  cpu::verify_sample(c.args, p.const_data_ptr<float>(), q.const_data_ptr<float>(), u.const_data_ptr<float>(),
                     at::get_num_threads());
  return c.result();
}

}  // namespace

TORCH_LIBRARY_IMPL(effx, CPU, m) {
  m.impl("sampling_probs", &sampling_probs_cpu);
  m.impl("tree_verify_greedy", &tree_verify_greedy_cpu);
  m.impl("tree_verify_match", &tree_verify_match_cpu);
  m.impl("tree_verify_sample", &tree_verify_sample_cpu);
}

}  // namespace ops
}  // namespace effx
