// effx family: tree speculative decoding, CUDA entry points (semantics and layout in
// include/effx/spec.h). Pointers are device memory; one thread block walks one batch row.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "effx/spec.h"

namespace effx {
namespace cuda {

cudaError_t sampling_probs(const void* logits, DType dtype, int64_t rows, int64_t vocab, float temperature,
                           float top_p, float* probs, cudaStream_t stream);

cudaError_t verify_greedy(const TreeArgs& t, const void* logits, DType dtype, cudaStream_t stream);

cudaError_t verify_match(const TreeArgs& t, const int64_t* target_tokens, cudaStream_t stream);

// workspace: verify_sample_workspace_bytes(t) bytes (the working p and q of every row).
size_t verify_sample_workspace_bytes(const TreeArgs& t);
cudaError_t verify_sample(const TreeArgs& t, const float* target_probs, const float* draft_probs,
                          const float* uniforms, void* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace effx
