// effx family: Monarch matmul, argument checks and allocation (see monarch_args.h).
#include "monarch_args.h"

#include "checks.h"

namespace effx {
namespace ops {
namespace {

DType monarch_dtype(const at::Tensor& t, const char* op, const char* arg) {
  if (t.scalar_type() == at::kDouble) {
    EFFX_CHECK(t.device().is_cpu(), op, arg,
               " must be float32, float16 or bfloat16 on CUDA (float64 is CPU only), got Double");
    return DType::Float64;
  }
  return float_dtype(t, op, arg);
}

MonarchCall prepare_common(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
                           const char* op) {
  EFFX_CHECK(x.dim() >= 1, op, "x must have at least 1 dim, got a 0-dim tensor");
  const DType dtype = monarch_dtype(x, op, "x");
  check_same_device(x, "x", w1, "w1", op);
  check_same_device(x, "x", w2, "w2", op);
  EFFX_CHECK(w1.dim() == 3, op, "w1 must be 3-D (k blocks of q x p), got shape ", w1.sizes());
  EFFX_CHECK(w2.dim() == 3, op, "w2 must be 3-D (l blocks of s x r), got shape ", w2.sizes());
  EFFX_CHECK(w1.scalar_type() == x.scalar_type(), op, "w1 must have the dtype of x (",
             describe(x.scalar_type()), "), got ", describe(w1.scalar_type()));
  EFFX_CHECK(w2.scalar_type() == x.scalar_type(), op, "w2 must have the dtype of x (",
             describe(x.scalar_type()), "), got ", describe(w2.scalar_type()));
  EFFX_CHECK(w1.numel() > 0, op, "w1 must be non-empty, got shape ", w1.sizes());
  EFFX_CHECK(w2.numel() > 0, op, "w2 must be non-empty, got shape ", w2.sizes());
  const int64_t k = w1.size(0), q = w1.size(1), p = w1.size(2);
  const int64_t l = w2.size(0), s = w2.size(1), r = w2.size(2);
  EFFX_CHECK(l * r == k * q, op, "w2 must have l * r == k * q = ", k * q, " (w1 of shape ",
             w1.sizes(), "), got shape ", w2.sizes(), " with l * r = ", l * r);
  EFFX_CHECK(x.size(-1) == k * p, op, "x must have last dim k * p = ", k * p, " (w1 of shape ",
             w1.sizes(), "), got ", x.size(-1));

  MonarchCall call;
  call.dtype = dtype;
  int64_t stride = row_stride(x);
  call.x = stride >= 0 ? x : x.contiguous();
  if (stride < 0) stride = k * p;
  call.w1 = w1.contiguous();
  call.w2 = w2.contiguous();
  call.shape = MonarchShape{x.numel() / (k * p), k, q, p, l, s, r, stride};
  return call;
}

}  // namespace

MonarchCall prepare_monarch_forward(const at::Tensor& x, const at::Tensor& w1,
                                    const at::Tensor& w2) {
  MonarchCall call = prepare_common(x, w1, w2, "monarch_matmul");
  auto out_shape = x.sizes().vec();
  out_shape.back() = call.shape.n_out();
  call.out = at::empty(out_shape, x.options());
  return call;
}

MonarchCall prepare_monarch_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                     const at::Tensor& w1, const at::Tensor& w2) {
  constexpr const char* op = "monarch_matmul_backward";
  MonarchCall call = prepare_common(x, w1, w2, op);
  check_same_device(x, "x", grad_out, "grad_out", op);
  EFFX_CHECK(grad_out.scalar_type() == x.scalar_type(), op, "grad_out must have the dtype of x (",
             describe(x.scalar_type()), "), got ", describe(grad_out.scalar_type()));
  auto expected = x.sizes().vec();
  expected.back() = call.shape.n_out();
  EFFX_CHECK(grad_out.sizes() == at::IntArrayRef(expected), op, "grad_out must have shape ",
             at::IntArrayRef(expected), ", got ", grad_out.sizes());
  call.grad = grad_out.contiguous();
  call.out = at::empty(x.sizes(), x.options());
  call.grad_w1 = at::empty(w1.sizes(), w1.options());
  call.grad_w2 = at::empty(w2.sizes(), w2.options());
  return call;
}

}  // namespace ops
}  // namespace effx
