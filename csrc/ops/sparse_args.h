// effx family: DejaVu contextual sparsity. Argument checks and output allocation shared by the
// CPU and CUDA implementations, so both backends accept and reject exactly the same inputs.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

#include "effx/sparse.h"

namespace effx {
namespace ops {

struct SparseUpCall {
  SparseUpShape shape;
  DType dtype;
  Activation act;
  at::Tensor x, w_up, w_gate, b_up, b_gate;  // undefined when absent; rows have unit stride
  at::Tensor idx;                            // int64, contiguous, on the device of x
  at::Tensor h;                              // output [batch, k * rows_per_index]
};

struct SparseDownCall {
  SparseDownShape shape;
  DType dtype;
  at::Tensor h, w_down_t, b_down, idx;
  at::Tensor y;  // output [batch, d]
};

SparseUpCall prepare_sparse_up(const at::Tensor& x, const at::Tensor& w_up, const at::Tensor& idx,
                               const std::string& activation,
                               const std::optional<at::Tensor>& w_gate,
                               const std::optional<at::Tensor>& b_up,
                               const std::optional<at::Tensor>& b_gate, int64_t rows_per_index,
                               bool check_indices, const char* op = "sparse_mlp_up");

SparseDownCall prepare_sparse_down(const at::Tensor& h, const at::Tensor& w_down_t,
                                   const at::Tensor& idx, const std::optional<at::Tensor>& b_down,
                                   int64_t rows_per_index, bool check_indices,
                                   const char* op = "sparse_mlp_down");

// The fused MLP: the up call's output h is the down call's input.
struct SparseMlpCall {
  SparseUpCall up;
  SparseDownCall down;
};

SparseMlpCall prepare_sparse_mlp(const at::Tensor& x, const at::Tensor& w_up,
                                 const at::Tensor& w_down_t, const at::Tensor& idx,
                                 const std::string& activation,
                                 const std::optional<at::Tensor>& w_gate,
                                 const std::optional<at::Tensor>& b_up,
                                 const std::optional<at::Tensor>& b_down,
                                 const std::optional<at::Tensor>& b_gate, bool check_indices);

// Data pointer of an optional tensor, null when it is absent.
inline const void* maybe_data(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

}  // namespace ops
}  // namespace effx
