// effx: input validation shared by every op (see checks.h).
#include "checks.h"

namespace effx {
namespace ops {

DType float_dtype(at::ScalarType t, const char* op, const char* arg) {
  switch (t) {
    case at::kFloat: return DType::Float32;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    default:
      EFFX_CHECK(false, op, arg, " must be float32, float16 or bfloat16, got ", describe(t));
  }
  return DType::Float32;
}

DType float_dtype(const at::Tensor& t, const char* op, const char* arg) {
  return float_dtype(t.scalar_type(), op, arg);
}

int64_t row_stride(const at::Tensor& t) {
  const int64_t d = t.dim();
  if (d == 0) return 1;
  if (t.size(d - 1) > 1 && t.stride(d - 1) != 1) return -1;
  // Leading dims must collapse into one: each (non-trivial) dim steps over the next one.
  int64_t rows_stride = -1, inner_stride = -1, inner_size = 1;
  for (int64_t i = d - 2; i >= 0; --i) {
    if (t.size(i) == 1) continue;
    if (inner_stride < 0) {
      rows_stride = t.stride(i);
    } else if (t.stride(i) != inner_stride * inner_size) {
      return -1;
    }
    inner_stride = t.stride(i);
    inner_size = t.size(i);
  }
  return rows_stride >= 0 ? rows_stride : t.size(d - 1);
}

void check_same_device(const at::Tensor& a, const char* arg_a, const at::Tensor& b,
                       const char* arg_b, const char* op) {
  EFFX_CHECK(a.device() == b.device(), op, arg_b, " must be on the device of ", arg_a, " (",
             a.device().str(), "), got ", b.device().str());
}

}  // namespace ops
}  // namespace effx
