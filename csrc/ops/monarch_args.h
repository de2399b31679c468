// effx family: Monarch matmul. Argument checks and output allocation shared by the CPU and
// CUDA implementations, so both backends accept and reject exactly the same inputs (except
// float64, which only the CPU kernels take).
#pragma once

#include <ATen/ATen.h>

#include "effx/monarch.h"

namespace effx {
namespace ops {

struct MonarchCall {
  MonarchShape shape;
  DType dtype;
  at::Tensor x;       // x itself, or a contiguous copy when its strides have no row view
  at::Tensor w1, w2;  // contiguous
  at::Tensor grad;    // backward only: contiguous [rows, n_out]
  at::Tensor out;     // forward: [..., n_out]; backward: grad_x [..., n_in]
  at::Tensor grad_w1, grad_w2;
};

MonarchCall prepare_monarch_forward(const at::Tensor& x, const at::Tensor& w1,
                                    const at::Tensor& w2);

MonarchCall prepare_monarch_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                     const at::Tensor& w1, const at::Tensor& w2);

}  // namespace ops
}  // namespace effx
