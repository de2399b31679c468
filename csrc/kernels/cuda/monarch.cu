// effx family: Monarch structured matrices, CUDA kernels (layout in include/effx/monarch.h).
// Each stage is one batched block GEMM (block_gemm.cuh) over all rows, every operand read
// along a unit-stride dim so that its loads coalesce: stage 1 stores out1 with P1 folded in
// (as [j][t][c], the layout stage 2 reads contiguously; plain [t][n_mid] when q % l != 0), and
// stage 2 writes [j][t][d], which one transpose pass interleaves into out (P2). The backward
// de-interleaves grad_out once the same way and recomputes out1 rather than keeping it.
// Intermediates live in the workspace in the storage dtype: a tensor-core GEMM rounds its
// operands to it anyway.
#include <type_traits>

#include "block_gemm.cuh"
#include "effx/monarch_cuda.h"

namespace effx {
namespace cuda {
namespace {

using block_gemm::GemmView;

// dst[t * d_t + c * d_c + j * d_j] = src[t * s_t + c * s_c + j * s_j] for t < rows, c < r, j < l.
struct Permute {
  long long rows, r, l;
  long long s_t, s_c, s_j;
  long long d_t, d_c, d_j;
};

// One 32 x 32 (j, c) tile of one row t per block, through shared memory, so the reads run
// along the source's unit-stride dim and the writes along the destination's.
template <typename T>
__global__ void __launch_bounds__(256) permute_kernel(Permute p, const T* __restrict__ src, T* __restrict__ dst) {
  __shared__ T tile[32][33];
  const long long t = blockIdx.x, c0 = static_cast<long long>(blockIdx.y) * 32, j0 = static_cast<long long>(blockIdx.z) * 32;
  const int tx = threadIdx.x % 32, ty = threadIdx.x / 32;
  const bool read_c = p.s_c == 1, write_j = p.d_j == 1;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int a = ty + 8 * i;
    const int jj = read_c ? a : tx, cc = read_c ? tx : a;
    const long long j = j0 + jj, c = c0 + cc;
    if (j < p.l && c < p.r) tile[jj][cc] = src[t * p.s_t + c * p.s_c + j * p.s_j];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int a = ty + 8 * i;
    const int jj = write_j ? tx : a, cc = write_j ? a : tx;
    const long long j = j0 + jj, c = c0 + cc;
    if (j < p.l && c < p.r) dst[t * p.d_t + c * p.d_c + j * p.d_j] = tile[jj][cc];
  }
}

template <typename T>
cudaError_t permute(const Permute& p, const T* src, T* dst, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(p.rows), static_cast<unsigned>((p.r + 31) / 32),
                  static_cast<unsigned>((p.l + 31) / 32));
  permute_kernel<T><<<grid, 256, 0, stream>>>(p, src, dst);
  return cudaGetLastError();
}

// Tensor-core operand type for a storage type (fp32 stays on the FMA path).
template <typename T> struct OperandOf { using type = T; };

// Where out1 lives: with q % l == 0 each stage-1 block's columns i*q + a map to
// (j, c) = (a % l, i*q/l + a/l), so stage 1 can write [j][t][c] directly.
struct Mid {
  bool split;
  long long a_g, a_m, a_k;  // out1(t, c) of block j, as stage 2's A(j, t, c)
};

Mid mid_layout(const MonarchShape& m) {
  if (m.q % m.l == 0) return {true, m.rows * m.r, m.r, 1};
  return {false, 1, m.n_mid(), m.l};
}

// Stage 1: out1 = P1-ordered x[t, i*p + b] w1[i, a, b]^T into `mid`.
GemmView stage1_view(const MonarchShape& m, const Mid& mid) {
  const long long ldx = m.x_row_stride;
  if (mid.split) {
    GemmView v{m.k, m.rows, m.q, m.p, m.p, ldx, 1, m.q * m.p, 1, m.p, m.q / m.l, m.r, m.rows * m.r};
    v.c_split = m.l;
    v.c_n_hi = 1;
    return v;
  }
  return {m.k, m.rows, m.q, m.p, m.p, ldx, 1, m.q * m.p, 1, m.p, m.q, m.n_mid(), 1};
}

template <typename T>
cudaError_t forward_typed(const MonarchShape& m, const T* x, const T* w1, const T* w2, T* out, T* ws,
                          cudaStream_t stream) {
  using S = typename OperandOf<T>::type;
  const Mid mid = mid_layout(m);
  T* out1 = ws;
  T* out2 = ws + m.rows * m.n_mid();  // [j][t][d]
  cudaError_t err = block_gemm::gemm<S>(stage1_view(m, mid), x, w1, out1, stream);
  if (err != cudaSuccess) return err;
  // out2[j, t, d] = sum_c out1(j, t, c) w2[j, d, c]
  const GemmView s2{m.l, m.rows, m.s, m.r, mid.a_g, mid.a_m, mid.a_k, m.s * m.r, 1, m.r, m.rows * m.s, m.s, 1};
  err = block_gemm::gemm<S>(s2, out1, w2, out2, stream);
  if (err != cudaSuccess) return err;
  // out[t, d*l + j] = out2[j, t, d]
  return permute(Permute{m.rows, m.s, m.l, m.s, 1, m.rows * m.s, m.n_out(), m.l, 1}, out2, out, stream);
}

template <typename T>
cudaError_t backward_typed(const MonarchShape& m, const T* dout, const T* x, const T* w1, const T* w2, T* dx,
                           T* dw1, T* dw2, T* ws, cudaStream_t stream) {
  using S = typename OperandOf<T>::type;
  const long long kq = m.n_mid(), ldx = m.x_row_stride, n_out = m.n_out(), n_in = m.n_in();
  const Mid mid = mid_layout(m);
  T* out1 = ws;
  T* dout2 = out1 + m.rows * kq;     // [j][t][d]
  T* dmid2 = dout2 + m.rows * n_out;  // [j][t][c]
  T* dmid = dmid2 + m.rows * kq;      // [t][c*l + j]
  // dout2[j, t, d] = dout[t, d*l + j]
  const Permute deinterleave{m.rows, m.s, m.l, n_out, m.l, 1, m.s, 1, m.rows * m.s};
  // dmid2[j, t, c] = sum_d dout2[j, t, d] w2[j, d, c]
  const GemmView dz{m.l, m.rows, m.r, m.s, m.rows * m.s, m.s, 1, m.s * m.r, m.r, 1, m.rows * m.r, m.r, 1};
  // dmid[t, c*l + j] = dmid2[j, t, c]
  const Permute interleave{m.rows, m.r, m.l, m.r, 1, m.rows * m.r, kq, m.l, 1};
  // dw2[j, d, c] = sum_t dout2[j, t, d] out1(j, t, c)
  const GemmView g2{m.l, m.s, m.r, m.rows, m.rows * m.s, 1, m.s, mid.a_g, mid.a_m, mid.a_k, m.s * m.r, m.r, 1};
  // dx[t, i*p + b] = sum_a dmid[t, i*q + a] w1[i, a, b]
  const GemmView gx{m.k, m.rows, m.p, m.q, m.q, kq, 1, m.q * m.p, m.p, 1, m.p, n_in, 1};
  // dw1[i, a, b] = sum_t dmid[t, i*q + a] x[t, i*p + b]
  const GemmView g1{m.k, m.q, m.p, m.rows, m.q, 1, kq, m.p, ldx, 1, m.q * m.p, m.p, 1};
  cudaError_t err = block_gemm::gemm<S>(stage1_view(m, mid), x, w1, out1, stream);
  if (err == cudaSuccess) err = permute(deinterleave, dout, dout2, stream);
  if (err == cudaSuccess) err = block_gemm::gemm<S>(dz, dout2, w2, dmid2, stream);
  if (err == cudaSuccess) err = permute(interleave, dmid2, dmid, stream);
  if (err == cudaSuccess) err = block_gemm::gemm<S>(g2, dout2, out1, dw2, stream);
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
                            const void* w2, void* out, void* workspace, cudaStream_t stream) {
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return forward_typed<T>(m, static_cast<const T*>(x), static_cast<const T*>(w1),
                            static_cast<const T*>(w2), static_cast<T*>(out), static_cast<T*>(workspace),
                            stream);
  });
}

cudaError_t monarch_backward(const MonarchShape& m, DType dtype, const void* grad_out,
                             const void* x, const void* w1, const void* w2, void* grad_x,
                             void* grad_w1, void* grad_w2, void* workspace,
                             cudaStream_t stream) {
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return backward_typed<T>(m, static_cast<const T*>(grad_out), static_cast<const T*>(x),
                             static_cast<const T*>(w1), static_cast<const T*>(w2),
                             static_cast<T*>(grad_x), static_cast<T*>(grad_w1),
                             static_cast<T*>(grad_w2), static_cast<T*>(workspace), stream);
  });
}

}  // namespace cuda
}  // namespace effx
