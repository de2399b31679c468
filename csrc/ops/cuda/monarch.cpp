// effx family: Monarch matmul, CUDA operator implementations (host C++; the kernels are in
// csrc/kernels/cuda/monarch.cu). The workspace for the intermediates comes from torch's caching
// allocator, on the current stream.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../monarch_args.h"
#include "effx/monarch_cuda.h"

namespace effx {
namespace ops {
namespace {

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "effx.", op, ": CUDA kernel failed: ", cudaGetErrorString(err));
}

at::Tensor workspace(const MonarchCall& c, const at::Tensor& like, bool backward) {
  return at::empty({cuda::monarch_workspace_bytes(c.shape, c.dtype, backward)}, like.options().dtype(at::kByte));
}

at::Tensor monarch_matmul_cuda(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2) {
  const c10::cuda::CUDAGuard guard(x.device());
  MonarchCall c = prepare_monarch_forward(x, w1, w2);
  at::Tensor ws = workspace(c, x, false);
  check_launch(cuda::monarch_forward(c.shape, c.dtype, c.x.const_data_ptr(), c.w1.const_data_ptr(),
                                     c.w2.const_data_ptr(), c.out.data_ptr(), ws.data_ptr(),
                                     at::cuda::getCurrentCUDAStream()),
               "monarch_matmul");
  return c.out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> monarch_matmul_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2) {
  const c10::cuda::CUDAGuard guard(x.device());
  MonarchCall c = prepare_monarch_backward(grad_out, x, w1, w2);
  at::Tensor ws = workspace(c, x, true);
  check_launch(cuda::monarch_backward(c.shape, c.dtype, c.grad.const_data_ptr(),
                                      c.x.const_data_ptr(), c.w1.const_data_ptr(),
                                      c.w2.const_data_ptr(), c.out.data_ptr(),
                                      c.grad_w1.data_ptr(), c.grad_w2.data_ptr(),
                                      ws.data_ptr(), at::cuda::getCurrentCUDAStream()),
               "monarch_matmul_backward");
  return {c.out, c.grad_w1, c.grad_w2};
}

}  // namespace

TORCH_LIBRARY_IMPL(effx, CUDA, m) {
  m.impl("monarch_matmul", &monarch_matmul_cuda);
  m.impl("monarch_matmul_backward", &monarch_matmul_backward_cuda);
}

}  // namespace ops
}  // namespace effx
