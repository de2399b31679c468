// effx family: group-wise asymmetric quantization, CUDA operator implementations (host C++;
// the kernels are in csrc/kernels/cuda/quant.cu).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../quant_args.h"
#include "effx/quant_cuda.h"

namespace effx {
namespace ops {
namespace {

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "effx.", op, ": CUDA kernel failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_cuda(const at::Tensor& x, int64_t bits,
                                                             int64_t group_size) {
  const c10::cuda::CUDAGuard guard(x.device());
  QuantizeCall c = prepare_quantize(x, bits, group_size);
  check_launch(cuda::quantize(c.shape, c.dtype, c.x.const_data_ptr(), c.codes.data_ptr<int32_t>(),
                              c.scale.data_ptr(), c.zero.data_ptr(),
                              c10::cuda::getCurrentCUDAStream()),
               "quantize");
  return {c.codes, c.scale, c.zero};
}

at::Tensor dequantize_cuda(const at::Tensor& codes, const at::Tensor& scale,
                           const at::Tensor& zero, int64_t bits, int64_t group_size,
                           at::ScalarType dtype) {
  const c10::cuda::CUDAGuard guard(codes.device());
  DequantizeCall c = prepare_dequantize(codes, scale, zero, bits, group_size, dtype);
  check_launch(cuda::dequantize(c.shape, c.codes.const_data_ptr<int32_t>(), c.param_dtype,
                                c.scale.const_data_ptr(), c.zero.const_data_ptr(), c.out_dtype,
                                c.out.data_ptr(), c10::cuda::getCurrentCUDAStream()),
               "dequantize");
  return c.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(effx, CUDA, m) {
  m.impl("quantize", &quantize_cuda);
  m.impl("dequantize", &dequantize_cuda);
}

}  // namespace ops
}  // namespace effx
