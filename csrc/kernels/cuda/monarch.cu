// effx family: Monarch structured matrices, CUDA kernels (layout in include/effx/monarch.h).
// Each stage is one batched block GEMM (block_gemm.cuh) over all rows; P1 and P2 are strides
// of its loads and stores. out1 goes through an fp32 workspace (rows x n_mid) that the next
// launch reads back, mostly from L2; the backward recomputes out1 rather than keeping it.
#include <type_traits>

#include "block_gemm.cuh"
#include "effx/monarch_cuda.h"

namespace effx {
namespace cuda {
namespace {

using block_gemm::GemmView;

// Tensor-core operand type for a storage type (fp32 stays on the FMA path).
template <typename T> struct OperandOf { using type = T; };

template <typename T>
cudaError_t forward_typed(const MonarchShape& m, const T* x, const T* w1, const T* w2, T* out,
                          float* mid, cudaStream_t stream) {
  using S = typename OperandOf<T>::type;
  const long long kq = m.n_mid(), ldx = m.x_row_stride;
  // mid[t, i*q + a] = sum_b x[t, i*p + b] w1[i, a, b]
  const GemmView s1{m.k, m.rows, m.q, m.p, m.p, ldx, 1, m.q * m.p, 1, m.p, m.q, kq, 1};
  cudaError_t err = block_gemm::gemm<S>(s1, x, w1, mid, stream);
  if (err != cudaSuccess) return err;
  // out[t, d*l + j] = sum_c mid[t, c*l + j] w2[j, d, c]
  const GemmView s2{m.l, m.rows, m.s, m.r, 1, kq, m.l, m.s * m.r, 1, m.r, 1, m.n_out(), m.l};
  return block_gemm::gemm<S>(s2, mid, w2, out, stream);
}

template <typename T>
cudaError_t backward_typed(const MonarchShape& m, const T* dout, const T* x, const T* w1,
                           const T* w2, T* dx, T* dw1, T* dw2, float* mid, cudaStream_t stream) {
  using S = typename OperandOf<T>::type;
  const long long kq = m.n_mid(), ldx = m.x_row_stride, n_out = m.n_out(), n_in = m.n_in();
  float* dmid = mid + m.rows * kq;
  const GemmView s1{m.k, m.rows, m.q, m.p, m.p, ldx, 1, m.q * m.p, 1, m.p, m.q, kq, 1};
  // dmid[t, c*l + j] = sum_d dout[t, d*l + j] w2[j, d, c]
  const GemmView dz{m.l, m.rows, m.r, m.s, 1, n_out, m.l, m.s * m.r, m.r, 1, 1, kq, m.l};
  // dw2[j, d, c] = sum_t dout[t, d*l + j] mid[t, c*l + j]
  const GemmView g2{m.l, m.s, m.r, m.rows, 1, m.l, n_out, 1, kq, m.l, m.s * m.r, m.r, 1};
  // dx[t, i*p + b] = sum_a dmid[t, i*q + a] w1[i, a, b]
  const GemmView gx{m.k, m.rows, m.p, m.q, m.q, kq, 1, m.q * m.p, m.p, 1, m.p, n_in, 1};
  // dw1[i, a, b] = sum_t dmid[t, i*q + a] x[t, i*p + b]
  const GemmView g1{m.k, m.q, m.p, m.rows, m.q, 1, kq, m.p, ldx, 1, m.q * m.p, m.p, 1};
  cudaError_t err = block_gemm::gemm<S>(s1, x, w1, mid, stream);
  if (err == cudaSuccess) err = block_gemm::gemm<S>(dz, dout, w2, dmid, stream);
  if (err == cudaSuccess) err = block_gemm::gemm<S>(g2, dout, mid, dw2, stream);
  if (err == cudaSuccess) err = block_gemm::gemm<S>(gx, dmid, w1, dx, stream);
  if (err == cudaSuccess) err = block_gemm::gemm<S>(g1, dmid, x, dw1, stream);
  return err;
}

template <typename F>
cudaError_t by_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float32: return f(float{});
    case DType::Float16: return f(__half{});
    case DType::BFloat16: return f(__nv_bfloat16{});
    case DType::Float64: return cudaErrorInvalidValue;  // CPU only (checked by the op layer)
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t monarch_forward(const MonarchShape& m, DType dtype, const void* x, const void* w1,
                            const void* w2, void* out, float* workspace, cudaStream_t stream) {
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return forward_typed<T>(m, static_cast<const T*>(x), static_cast<const T*>(w1),
                            static_cast<const T*>(w2), static_cast<T*>(out), workspace, stream);
  });
}

cudaError_t monarch_backward(const MonarchShape& m, DType dtype, const void* grad_out,
                             const void* x, const void* w1, const void* w2, void* grad_x,
                             void* grad_w1, void* grad_w2, float* workspace,
                             cudaStream_t stream) {
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return backward_typed<T>(m, static_cast<const T*>(grad_out), static_cast<const T*>(x),
                             static_cast<const T*>(w1), static_cast<const T*>(w2),
                             static_cast<T*>(grad_x), static_cast<T*>(grad_w1),
                             static_cast<T*>(grad_w2), workspace, stream);
  });
}

}  // namespace cuda
}  // namespace effx
