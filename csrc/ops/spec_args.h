// effx family: tree speculative decoding. Argument checks and output allocation shared by the
// CPU and CUDA implementations (semantics in include/effx/spec.h).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "effx/spec.h"

namespace effx {
namespace ops {

struct TreeCall {
  TreeArgs args;
  at::Tensor tokens, parents;  // contiguous, kept alive for the kernel
  at::Tensor accepted, num_accepted, bonus;
  std::tuple<at::Tensor, at::Tensor, at::Tensor> result() const { return {accepted, num_accepted, bonus}; }
};

// Checks tokens [B, N] and parents [N] or [B, N] (int64; when readable on the host,
// parents[i] in [-1, i) and tokens < vocab unless vocab is 0) and allocates the results.
TreeCall prepare_tree(const char* op, const at::Tensor& tokens, const at::Tensor& parents, int64_t vocab);

// Checks per-node rows [B, N + 1, vocab] of the given dtype against the call's tree; contiguous.
at::Tensor node_rows(const char* op, const char* arg, const TreeCall& c, const at::Tensor& t,
                     at::ScalarType dtype);

// Checks one value per node [B, N + 1] of the given dtype against the call's tree; contiguous.
at::Tensor node_values(const char* op, const char* arg, const TreeCall& c, const at::Tensor& t,
                       at::ScalarType dtype);

struct ProbsCall {
  at::Tensor logits, probs;  // logits contiguous; probs fp32 of the same shape
  DType dtype;
  int64_t rows, vocab;
};

ProbsCall prepare_sampling_probs(const at::Tensor& logits, double temperature, double top_p);

}  // namespace ops
}  // namespace effx
