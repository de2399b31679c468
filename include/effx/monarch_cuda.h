// effx family: Monarch structured matrices, CUDA entry points (layout in monarch.h).
// dtype is Float32, Float16 or BFloat16. `workspace` holds rows * n_mid fp32 values (the
// intermediate out1, and in the backward its gradient after it); monarch_workspace_floats
// says how many. fp16/bf16 run on tensor cores, so out1 is rounded to that dtype when it is
// read back as an operand (as the two-bmm PyTorch way does); fp32 stays fp32. Kernels are enqueued on `stream`; launch errors come back as the result.
#pragma once

#include <cuda_runtime_api.h>

#include "effx/monarch.h"

namespace effx {
namespace cuda {

inline int64_t monarch_workspace_floats(const MonarchShape& m, bool backward) {
  return (backward ? 2 : 1) * m.rows * m.n_mid();
}

cudaError_t monarch_forward(const MonarchShape& m, DType dtype, const void* x, const void* w1,
                            const void* w2, void* out, float* workspace, cudaStream_t stream);

cudaError_t monarch_backward(const MonarchShape& m, DType dtype, const void* grad_out,
                             const void* x, const void* w1, const void* w2, void* grad_x,
                             void* grad_w1, void* grad_w2, float* workspace,
                             cudaStream_t stream);

}  // namespace cuda
}  // namespace effx
