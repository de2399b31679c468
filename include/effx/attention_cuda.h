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

cudaError_t dense_attention(const AttentionArgs& a, const DenseKV& kv, DType dtype, void* workspace,
                            cudaStream_t stream);

}  // namespace cuda
}  // namespace effx
