// effx family: Monarch matmul, CPU operator implementations.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "monarch_args.h"

namespace effx {
namespace ops {
namespace {

at::Tensor monarch_matmul_cpu(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2) {
  MonarchCall c = prepare_monarch_forward(x, w1, w2);
  cpu::monarch_forward(c.shape, c.dtype, c.x.const_data_ptr(), c.w1.const_data_ptr(),
                       c.w2.const_data_ptr(), c.out.data_ptr(), at::get_num_threads());
  return c.out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> monarch_matmul_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2) {
  MonarchCall c = prepare_monarch_backward(grad_out, x, w1, w2);
  cpu::monarch_backward(c.shape, c.dtype, c.grad.const_data_ptr(), c.x.const_data_ptr(),
                        c.w1.const_data_ptr(), c.w2.const_data_ptr(), c.out.data_ptr(),
                        c.grad_w1.data_ptr(), c.grad_w2.data_ptr(), at::get_num_threads());
  return {c.out, c.grad_w1, c.grad_w2};
}

}  // namespace

TORCH_LIBRARY_IMPL(effx, CPU, m) {
  m.impl("monarch_matmul", &monarch_matmul_cpu);
  m.impl("monarch_matmul_backward", &monarch_matmul_backward_cpu);
}

}  // namespace ops
}  // namespace effx
