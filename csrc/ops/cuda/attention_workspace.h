// effx: what every CUDA cache-attention op (dense, H2O, KIVI) needs before its launch: the
// engine's head_dim limit and the split-K workspace (csrc/kernels/cuda/attention_engine.cuh).
#pragma once

#include <ATen/ATen.h>

#include "../attention_args.h"
#include "../checks.h"
#include "effx/attention_cuda.h"

namespace effx {
namespace ops {

inline at::Tensor attention_workspace(const char* op, const AttentionCall& c) {
  EFFX_CHECK(c.args.head_dim <= 256, op, "head_dim must be at most 256 on CUDA, got ", c.args.head_dim);
  return at::empty({static_cast<int64_t>(cuda::attention_workspace_bytes(c.args))}, c.q.options().dtype(at::kByte));
}

}  // namespace ops
}  // namespace effx
