// effx family: KIVI 2/4-bit KV cache, CUDA entry points (semantics in kivi.h; the attention
// workspace as in attention_cuda.h).
#pragma once

#include <cuda_runtime_api.h>

#include "effx/attention_cuda.h"
#include "effx/kivi.h"

namespace effx {
namespace cuda {

cudaError_t kivi_attention(const AttentionArgs& a, const KiviStorage& s, DType dtype, void* workspace,
                           cudaStream_t stream);

cudaError_t kivi_append(const KiviStorage& s, DType dtype, const Strided& k_new, const Strided& v_new,
                        int64_t new_len, const int64_t* new_lengths, cudaStream_t stream);

}  // namespace cuda
}  // namespace effx
