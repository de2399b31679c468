// effx family: H2O, CUDA entry points (semantics in h2o.h and attention.h).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "effx/attention_cuda.h"
#include "effx/h2o.h"

namespace effx {
namespace cuda {

// Dense cache attention that also accumulates a.scores (a.lse must be set: the scores are
// the exact probabilities exp(s - lse), summed per kv-head in a pass over the keys).
cudaError_t h2o_attention(const AttentionArgs& a, const DenseKV& kv, DType dtype, void* workspace,
                          cudaStream_t stream);

size_t h2o_evict_workspace_bytes(const H2OStorage& s);

cudaError_t h2o_evict(const H2OStorage& s, DType dtype, int64_t heavy, int64_t recent, void* workspace,
                      cudaStream_t stream);

}  // namespace cuda
}  // namespace effx
