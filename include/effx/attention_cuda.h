// effx: fused cache attention, CUDA entry points (semantics in attention.h). Long contexts
// are split across thread blocks (flash-decoding); the partial results need a workspace of
// attention_workspace_bytes(args) bytes from the caller.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "effx/attention.h"

namespace effx {
namespace cuda {

size_t attention_workspace_bytes(const AttentionArgs& a);

// With a.scores set (H2O), dense_attention accumulates them in the same pass when this says
// so (one-token decode with a.lse set and 16-byte aligned rows), and fails otherwise.
bool dense_attention_scores(const AttentionArgs& a, const DenseKV& kv, DType dtype);

cudaError_t dense_attention(const AttentionArgs& a, const DenseKV& kv, DType dtype, void* workspace,
                            cudaStream_t stream);

}  // namespace cuda
}  // namespace effx
