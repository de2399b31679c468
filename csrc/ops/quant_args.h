// effx family: group-wise quantization. Argument checks and output allocation shared by the
// CPU and CUDA implementations, so both backends accept and reject exactly the same inputs.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "effx/quant.h"

namespace effx {
namespace ops {

struct QuantizeCall {
  at::Tensor x;  // x itself, or a contiguous copy when its strides have no row view
  QuantShape shape;
  DType dtype;
  at::Tensor codes, scale, zero;
};

struct DequantizeCall {
  QuantShape shape;
  DType param_dtype, out_dtype;
  at::Tensor codes, scale, zero;  // contiguous
  at::Tensor out;
};

QuantizeCall prepare_quantize(const at::Tensor& x, int64_t bits, int64_t group_size);

DequantizeCall prepare_dequantize(const at::Tensor& codes, const at::Tensor& scale,
                                  const at::Tensor& zero, int64_t bits, int64_t group_size,
                                  at::ScalarType dtype);

}  // namespace ops
}  // namespace effx
