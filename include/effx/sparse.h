// effx family: DejaVu contextual sparsity (SPECS.md section 4), torch-free API.
//
// Layout: activations are row-major [batch, features] with contiguous features and any row
// stride. Weights are row-major with contiguous rows: the up (and gate) projection is
// [n, d] like nn.Linear.weight, the down projection is stored TRANSPOSED as [n, d] so that a
// selected neuron is one contiguous row. An index selects a unit of `rows_per_index`
// consecutive weight rows (1 for MLP neurons, head_dim for attention heads), so index i
// stands for rows [i * rows_per_index, (i + 1) * rows_per_index). Indices are int64, either
// one set of k shared by the whole batch (idx_row_stride 0) or one set per batch row
// (idx_row_stride >= k). The selected feature axis of h has k * rows_per_index entries, unit
// j of the index set at [j * rows_per_index, (j + 1) * rows_per_index).
//
//   up:   h[b, j*R + r] = act(x[b] . W[idx[j]*R + r] + b_up[...])               (ungated)
//         h[b, j*R + r] = act(x[b] . Wg[...] + b_gate[...]) * (x[b] . W[...] + b_up[...])
//   down: y[b, :] = sum over j in index order, r in order of h[b, j*R + r] * W2t[idx[j]*R + r, :]
//                   + b_down
//
// Accumulation is fp32. The down projection adds the selected rows of each output element in
// an order fixed by the shape alone (index order on the CPU), with no atomics, so results are
// bitwise reproducible on a machine for any thread count (CPU) and any launch (CUDA).
#pragma once

#include <cstdint>

#include "effx/dtype.h"

namespace effx {

enum class Activation : int { None = 0, Relu = 1, Gelu = 2, GeluTanh = 3, Silu = 4 };

struct SparseUpShape {
  int64_t batch;            // rows of x and h
  int64_t d;                // features of x (columns of the weights)
  int64_t k;                // indices per index set
  int64_t rows_per_index;   // weight rows selected by one index
  int64_t x_row_stride;     // elements between rows of x
  int64_t w_row_stride;     // elements between rows of w_up (and of w_gate)
  int64_t idx_row_stride;   // 0: one index set for the whole batch; else per batch row
};

struct SparseDownShape {
  int64_t batch;            // rows of h and y
  int64_t d;                // output features (columns of w_down_t)
  int64_t k;                // indices per index set
  int64_t rows_per_index;   // weight rows selected by one index
  int64_t h_row_stride;     // elements between rows of h
  int64_t w_row_stride;     // elements between rows of w_down_t
  int64_t idx_row_stride;   // 0: one index set for the whole batch; else per batch row
};

// Outcome of validating index sets: every index in [0, units) and none repeated within a set.
// On failure `set` and `position` locate the offending entry and `value` is its index.
enum class IndexProblem : int { None = 0, OutOfRange = 1, Duplicate = 2 };
struct IndexCheck {
  IndexProblem problem;
  int64_t set;
  int64_t position;
  int64_t value;
};

namespace cpu {

// idx: `sets` index sets of k entries, set s at idx + s * set_stride. Reports the first
// problem in (set, position) order.
IndexCheck check_indices(const int64_t* idx, int64_t sets, int64_t k, int64_t set_stride,
                         int64_t units);

// h: contiguous [batch, k * rows_per_index] of dtype. w_gate, b_up, b_gate may be null;
// biases have one entry per weight row.
void sparse_mlp_up(const SparseUpShape& s, DType dtype, Activation act, const void* x,
                   const void* w_up, const void* w_gate, const void* b_up, const void* b_gate,
                   const int64_t* idx, void* h, int num_threads);

// y: contiguous [batch, d] of dtype. b_down ([d]) may be null.
void sparse_mlp_down(const SparseDownShape& s, DType dtype, const void* h, const void* w_down_t,
                     const void* b_down, const int64_t* idx, void* y, int num_threads);

}  // namespace cpu
}  // namespace effx
