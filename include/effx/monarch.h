// effx family: Monarch structured matrices (SPECS.md section 6), torch-free API.
//
// Layout (the one effx.monarch.project returns): x is `rows` rows of n_in = k * p values,
// w1 is (k, q, p) row-major, w2 is (l, s, r) row-major with l * r = k * q, out is `rows`
// rows of n_out = l * s values, all with a contiguous last dim. Per row:
//   out1[i * q + a] = sum_b w1[i, a, b] * x[i * p + b]                    (k blocks)
//   out1 seen as (r, l) and transposed: z[j, c] = out1[c * l + j]          (P1)
//   out2[j, d]      = sum_c w2[j, d, c] * z[j, c]                          (l blocks)
//   out[d * l + j]  = out2[j, d]                                           (P2)
// Accumulation is fp32 for fp32/fp16/bf16 storage and fp64 for Float64 (CPU only). On CPU the
// intermediate out1 stays fp32 (fp64) and never leaves the row tile being processed, except in
// the bf16 forward of 16 rows or more on CPUs with AVX512_BF16 or AMX, whose stages run on bf16
// pairs (out1 rounded to bf16 between them, as on CUDA); on CUDA see monarch_cuda.h.
#pragma once

#include <cstdint>

#include "effx/dtype.h"

namespace effx {

struct MonarchShape {
  int64_t rows;          // independent rows (tokens): the product of x's leading dims
  int64_t k, q, p;       // w1: k blocks of q x p
  int64_t l, s, r;       // w2: l blocks of s x r
  int64_t x_row_stride;  // elements between consecutive rows of x

  int64_t n_in() const { return k * p; }
  int64_t n_mid() const { return k * q; }
  int64_t n_out() const { return l * s; }
};

// A shape is valid when every size is positive and l * r == k * q.
inline bool monarch_shape_valid(const MonarchShape& m) {
  return m.rows >= 0 && m.k > 0 && m.q > 0 && m.p > 0 && m.l > 0 && m.s > 0 && m.r > 0 &&
         m.l * m.r == m.k * m.q && m.x_row_stride >= m.k * m.p;
}

namespace cpu {

// out: rows x n_out, contiguous, dtype of x. dtype may be Float64.
void monarch_forward(const MonarchShape& m, DType dtype, const void* x, const void* w1,
                     const void* w2, void* out, int num_threads);

// grad_out: rows x n_out contiguous. Writes grad_x (rows x n_in, contiguous), grad_w1 (k, q, p)
// and grad_w2 (l, s, r), all of `dtype`: dx = P1^T B1^T (B2^T P2^T dout),
// dw2[j] = sum over rows of dout2[j] z[j]^T, dw1[i] = sum over rows of dout1[i] x[i]^T.
void monarch_backward(const MonarchShape& m, DType dtype, const void* grad_out, const void* x,
                      const void* w1, const void* w2, void* grad_x, void* grad_w1,
                      void* grad_w2, int num_threads);

}  // namespace cpu
}  // namespace effx
