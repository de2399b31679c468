// effx family: DejaVu contextual sparsity, CUDA entry points (layout in sparse.h).
// Kernels are enqueued on `stream` and report launch errors through the return value. Indices
// must already be valid (the op layer checks them); the kernels do not re-check.
#pragma once

#include <cuda_runtime_api.h>

#include "effx/sparse.h"

namespace effx {
namespace cuda {

cudaError_t sparse_mlp_up(const SparseUpShape& s, DType dtype, Activation act, const void* x,
                          const void* w_up, const void* w_gate, const void* b_up,
                          const void* b_gate, const int64_t* idx, void* h, cudaStream_t stream);

// fp32 values of scratch that sparse_mlp_down needs for shape `s` (0: none). The down
// projection splits the selected rows into slices whose partial sums land in this workspace
// and are then added in slice order, so the result does not depend on scheduling.
int64_t sparse_mlp_down_workspace(const SparseDownShape& s, DType dtype);

cudaError_t sparse_mlp_down(const SparseDownShape& s, DType dtype, const void* h,
                            const void* w_down_t, const void* b_down, const int64_t* idx,
                            float* workspace, void* y, cudaStream_t stream);

}  // namespace cuda
}  // namespace effx
