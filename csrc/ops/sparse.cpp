// effx family: DejaVu contextual sparsity, CPU operator implementations.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "sparse_args.h"

namespace effx {
namespace ops {
namespace {

void run_up(const SparseUpCall& c) {
  cpu::sparse_mlp_up(c.shape, c.dtype, c.act, c.x.const_data_ptr(), c.w_up.const_data_ptr(),
                     maybe_data(c.w_gate), maybe_data(c.b_up), maybe_data(c.b_gate),
                     c.idx.const_data_ptr<int64_t>(), c.h.data_ptr(), at::get_num_threads());
}

void run_down(const SparseDownCall& c) {
  cpu::sparse_mlp_down(c.shape, c.dtype, c.h.const_data_ptr(), c.w_down_t.const_data_ptr(),
                       maybe_data(c.b_down), c.idx.const_data_ptr<int64_t>(), c.y.data_ptr(),
                       at::get_num_threads());
}

at::Tensor sparse_mlp_up_cpu(const at::Tensor& x, const at::Tensor& w_up, const at::Tensor& idx,
                             const std::string& activation,
                             const std::optional<at::Tensor>& w_gate,
                             const std::optional<at::Tensor>& b_up,
                             const std::optional<at::Tensor>& b_gate, int64_t rows_per_index,
                             bool check_indices) {
  SparseUpCall c = prepare_sparse_up(x, w_up, idx, activation, w_gate, b_up, b_gate,
                                     rows_per_index, check_indices);
  run_up(c);
  return c.h;
}

at::Tensor sparse_mlp_down_cpu(const at::Tensor& h, const at::Tensor& w_down_t,
                               const at::Tensor& idx, const std::optional<at::Tensor>& b_down,
                               int64_t rows_per_index, bool check_indices) {
  SparseDownCall c = prepare_sparse_down(h, w_down_t, idx, b_down, rows_per_index, check_indices);
  run_down(c);
  return c.y;
}

at::Tensor sparse_mlp_cpu(const at::Tensor& x, const at::Tensor& w_up, const at::Tensor& w_down_t,
                          const at::Tensor& idx, const std::string& activation,
                          const std::optional<at::Tensor>& w_gate,
                          const std::optional<at::Tensor>& b_up,
                          const std::optional<at::Tensor>& b_down,
                          const std::optional<at::Tensor>& b_gate, bool check_indices) {
  SparseMlpCall c = prepare_sparse_mlp(x, w_up, w_down_t, idx, activation, w_gate, b_up, b_down,
                                       b_gate, check_indices);
  run_up(c.up);
  run_down(c.down);
  return c.down.y;
}

}  // namespace

TORCH_LIBRARY_IMPL(effx, CPU, m) {
  m.impl("sparse_mlp_up", &sparse_mlp_up_cpu);
  m.impl("sparse_mlp_down", &sparse_mlp_down_cpu);
  m.impl("sparse_mlp", &sparse_mlp_cpu);
}

}  // namespace ops
}  // namespace effx
