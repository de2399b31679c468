// effx family: DejaVu contextual sparsity, argument checks and allocation (see sparse_args.h).
#include "sparse_args.h"

#include "checks.h"

namespace effx {
namespace ops {
namespace {

// `t` with unit stride along its last dim (a copy only when it has none) and its row stride.
std::pair<at::Tensor, int64_t> with_rows(const at::Tensor& t) {
  const int64_t stride = row_stride(t);
  if (stride >= 0) return {t, stride};
  at::Tensor c = t.contiguous();
  return {c, c.size(-1)};
}

Activation parse_activation(const std::string& name, const char* op) {
  if (name == "none") return Activation::None;
  if (name == "relu") return Activation::Relu;
  if (name == "gelu") return Activation::Gelu;
  if (name == "gelu_tanh") return Activation::GeluTanh;
  if (name == "silu") return Activation::Silu;
  EFFX_CHECK(false, op, "activation must be one of none, relu, gelu, gelu_tanh, silu, got '", name,
             "'");
  return Activation::None;
}

void check_float_2d(const at::Tensor& t, const char* arg, const char* what, const char* op) {
  float_dtype(t, op, arg);
  EFFX_CHECK(t.dim() == 2, op, arg, " must be 2-D ", what, ", got shape ", t.sizes());
}

void check_like(const at::Tensor& ref, const char* ref_arg, const at::Tensor& t, const char* arg,
                const char* op) {
  check_same_device(ref, ref_arg, t, arg, op);
  EFFX_CHECK(t.scalar_type() == ref.scalar_type(), op, arg, " must have the dtype of ", ref_arg,
             " (", describe(ref.scalar_type()), "), got ", describe(t.scalar_type()));
}

void check_bias(const at::Tensor& ref, const char* ref_arg, const at::Tensor& bias, const char* arg,
                int64_t size, const char* op) {
  check_like(ref, ref_arg, bias, arg, op);
  EFFX_CHECK(bias.dim() == 1 && bias.size(0) == size, op, arg, " must have shape [", size,
             "], got ", bias.sizes());
}

void check_rows_per_index(int64_t rows_per_index, int64_t n, const char* w_arg, const char* op) {
  EFFX_CHECK(rows_per_index >= 1, op, "rows_per_index must be >= 1, got ", rows_per_index);
  EFFX_CHECK(n % rows_per_index == 0, op, "rows_per_index must divide the rows of ", w_arg, " (",
             n, "), got ", rows_per_index);
}

// Index sets as int64 on their device; `units` is how many distinct indices exist. Validation
// reads the indices on the host (on CUDA this waits for the stream: callers whose indices are
// valid by construction, such as top-k, pass check_indices = false).
at::Tensor prepare_indices(const at::Tensor& idx, const at::Tensor& x, const char* x_arg,
                           int64_t batch, int64_t units, bool check, const char* op) {
  check_same_device(x, x_arg, idx, "idx", op);
  EFFX_CHECK(idx.scalar_type() == at::kLong || idx.scalar_type() == at::kInt, op,
             "idx must be int32 or int64, got ", describe(idx.scalar_type()));
  EFFX_CHECK(idx.dim() == 1 || (idx.dim() == 2 && idx.size(0) == batch), op,
             "idx must be 1-D [k] (one set for the batch) or 2-D [", batch,
             ", k] (one set per row), got shape ", idx.sizes());
  at::Tensor out = idx.to(at::kLong).contiguous();
  if (check && out.numel() > 0) {
    const at::Tensor host = out.cpu();
    const int64_t k = out.size(-1);
    const int64_t sets = out.dim() == 1 ? 1 : batch;
    const IndexCheck r = cpu::check_indices(host.const_data_ptr<int64_t>(), sets, k, k, units);
    const std::string where = out.dim() == 1
        ? " at position " + std::to_string(r.position)
        : " at position " + std::to_string(r.position) + " of row " + std::to_string(r.set);
    EFFX_CHECK(r.problem != IndexProblem::OutOfRange, op, "idx must be in [0, ", units, "), got ",
               r.value, where);
    EFFX_CHECK(r.problem != IndexProblem::Duplicate, op,
               "idx must not repeat an index within a set, got ", r.value, " again", where);
  }
  return out;
}

}  // namespace

SparseUpCall prepare_sparse_up(const at::Tensor& x_in, const at::Tensor& w_up_in,
                               const at::Tensor& idx, const std::string& activation,
                               const std::optional<at::Tensor>& w_gate_in,
                               const std::optional<at::Tensor>& b_up,
                               const std::optional<at::Tensor>& b_gate, int64_t rows_per_index,
                               bool check_indices, const char* op) {
  SparseUpCall call;
  call.act = parse_activation(activation, op);
  check_float_2d(x_in, "x", "[batch, d]", op);
  call.dtype = float_dtype(x_in, op, "x");
  check_like(x_in, "x", w_up_in, "w_up", op);
  EFFX_CHECK(w_up_in.dim() == 2 && w_up_in.size(1) == x_in.size(1), op,
             "w_up must have shape [n, ", x_in.size(1), "] to match x, got ", w_up_in.sizes());
  const int64_t n = w_up_in.size(0);
  check_rows_per_index(rows_per_index, n, "w_up", op);
  const int64_t batch = x_in.size(0);
  call.idx = prepare_indices(idx, x_in, "x", batch, n / rows_per_index, check_indices, op);
  const int64_t k = call.idx.size(-1);

  int64_t x_stride, w_stride;
  std::tie(call.x, x_stride) = with_rows(x_in);
  std::tie(call.w_up, w_stride) = with_rows(w_up_in);
  if (w_gate_in) {
    check_like(x_in, "x", *w_gate_in, "w_gate", op);
    EFFX_CHECK(w_gate_in->sizes() == w_up_in.sizes(), op, "w_gate must have the shape of w_up (",
               w_up_in.sizes(), "), got ", w_gate_in->sizes());
    int64_t g_stride;
    std::tie(call.w_gate, g_stride) = with_rows(*w_gate_in);
    if (g_stride != w_stride) {
      // The kernel reads gate and up rows with one stride.
      call.w_up = call.w_up.contiguous();
      call.w_gate = call.w_gate.contiguous();
      w_stride = x_in.size(1);
    }
  }
  if (b_up) {
    check_bias(x_in, "x", *b_up, "b_up", n, op);
    call.b_up = b_up->contiguous();
  }
  if (b_gate) {
    EFFX_CHECK(w_gate_in.has_value(), op, "b_gate must be None when w_gate is None, got a tensor");
    check_bias(x_in, "x", *b_gate, "b_gate", n, op);
    call.b_gate = b_gate->contiguous();
  }
  call.shape = SparseUpShape{batch, x_in.size(1), k, rows_per_index, x_stride, w_stride,
                             call.idx.dim() == 1 ? 0 : k};
  call.h = at::empty({batch, k * rows_per_index}, x_in.options());
  return call;
}

SparseDownCall prepare_sparse_down(const at::Tensor& h_in, const at::Tensor& w_in,
                                   const at::Tensor& idx, const std::optional<at::Tensor>& b_down,
                                   int64_t rows_per_index, bool check_indices, const char* op) {
  SparseDownCall call;
  check_float_2d(h_in, "h", "[batch, k * rows_per_index]", op);
  call.dtype = float_dtype(h_in, op, "h");
  check_like(h_in, "h", w_in, "w_down_t", op);
  EFFX_CHECK(w_in.dim() == 2, op, "w_down_t must be 2-D [n, d] (the down projection transposed), got shape ",
             w_in.sizes());
  const int64_t n = w_in.size(0);
  const int64_t d = w_in.size(1);
  check_rows_per_index(rows_per_index, n, "w_down_t", op);
  const int64_t batch = h_in.size(0);
  call.idx = prepare_indices(idx, h_in, "h", batch, n / rows_per_index, check_indices, op);
  const int64_t k = call.idx.size(-1);
  EFFX_CHECK(h_in.size(1) == k * rows_per_index, op, "h must have k * rows_per_index = ",
             k * rows_per_index, " columns for idx of shape ", call.idx.sizes(), ", got ",
             h_in.size(1));

  int64_t h_stride, w_stride;
  std::tie(call.h, h_stride) = with_rows(h_in);
  std::tie(call.w_down_t, w_stride) = with_rows(w_in);
  if (b_down) {
    check_bias(h_in, "h", *b_down, "b_down", d, op);
    call.b_down = b_down->contiguous();
  }
  call.shape = SparseDownShape{batch, d, k, rows_per_index, h_stride, w_stride,
                               call.idx.dim() == 1 ? 0 : k};
  call.y = at::empty({batch, d}, h_in.options());
  return call;
}

SparseMlpCall prepare_sparse_mlp(const at::Tensor& x, const at::Tensor& w_up,
                                 const at::Tensor& w_down_t, const at::Tensor& idx,
                                 const std::string& activation,
                                 const std::optional<at::Tensor>& w_gate,
                                 const std::optional<at::Tensor>& b_up,
                                 const std::optional<at::Tensor>& b_down,
                                 const std::optional<at::Tensor>& b_gate, bool check_indices) {
  constexpr const char* op = "sparse_mlp";
  SparseMlpCall call;
  call.up = prepare_sparse_up(x, w_up, idx, activation, w_gate, b_up, b_gate, 1, check_indices, op);
  check_like(x, "x", w_down_t, "w_down_t", op);
  EFFX_CHECK(w_down_t.dim() == 2 && w_down_t.size(0) == w_up.size(0), op,
             "w_down_t must be 2-D [n, d] with the n = ", w_up.size(0), " rows of w_up, got shape ",
             w_down_t.sizes());
  // The indices were checked against the same n by the up projection.
  call.down = prepare_sparse_down(call.up.h, w_down_t, call.up.idx, b_down, 1, false, op);
  return call;
}

}  // namespace ops
}  // namespace effx
