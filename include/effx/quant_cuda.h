// effx family: group-wise asymmetric quantization, CUDA entry points (layout in quant.h).
// Kernels are enqueued on `stream` and report launch errors through the return value.
#pragma once

#include <cuda_runtime_api.h>

#include "effx/quant.h"

namespace effx {
namespace cuda {

cudaError_t quantize(const QuantShape& s, DType dtype, const void* x, int32_t* codes,
                     void* scale, void* zero, cudaStream_t stream);

cudaError_t dequantize(const QuantShape& s, const int32_t* codes, DType param_dtype,
                       const void* scale, const void* zero, DType out_dtype, void* out,
                       cudaStream_t stream);

}  // namespace cuda
}  // namespace effx
