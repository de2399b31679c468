// effx family: Monarch structured matrices, CUDA entry points (layout in monarch.h).
// dtype is Float32, Float16 or BFloat16. `workspace` holds the intermediates in that dtype
// (out1 and the stage-2 result; in the backward also grad_out de-interleaved and out1's
// gradient in two layouts), at least monarch_workspace_bytes long and 16-byte aligned.
// fp16/bf16 run on tensor cores, so out1 is rounded to that dtype when it is read back as an
// operand (as the two-bmm PyTorch way does); fp32 stays fp32. Kernels are enqueued on
// `stream`; launch errors come back as the result.
#pragma once

#include <cuda_runtime_api.h>

#include "effx/monarch.h"

namespace effx {
namespace cuda {

inline int64_t monarch_workspace_bytes(const MonarchShape& m, DType dtype, bool backward) {
  const int64_t values = backward ? m.rows * (3 * m.n_mid() + m.n_out()) : m.rows * (m.n_mid() + m.n_out());
  return values * static_cast<int64_t>(dtype_size(dtype));
}

cudaError_t monarch_forward(const MonarchShape& m, DType dtype, const void* x, const void* w1,
                            const void* w2, void* out, void* workspace, cudaStream_t stream);

cudaError_t monarch_backward(const MonarchShape& m, DType dtype, const void* grad_out,
                             const void* x, const void* w1, const void* w2, void* grad_x,
                             void* grad_w1, void* grad_w2, void* workspace,
                             cudaStream_t stream);

}  // namespace cuda
}  // namespace effx
