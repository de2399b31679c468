// effx: input validation shared by every op. Messages follow one pattern so users can act on
// them: "effx.<op>: <argument> must <expectation>, got <what was seen>".
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "effx/dtype.h"

namespace effx {
namespace ops {

#define EFFX_CHECK(cond, op, ...) TORCH_CHECK(cond, "effx.", op, ": ", __VA_ARGS__)

inline std::string describe(at::ScalarType t) { return c10::toString(t); }

// Floating storage dtype of an activation tensor (fp32, fp16, bf16).
DType float_dtype(const at::Tensor& t, const char* op, const char* arg);
DType float_dtype(at::ScalarType t, const char* op, const char* arg);

// Elements between consecutive rows when `t` is seen as [numel / size(-1), size(-1)] without
// a copy, or -1 when its strides do not allow that view.
int64_t row_stride(const at::Tensor& t);

void check_same_device(const at::Tensor& a, const char* arg_a, const at::Tensor& b,
                       const char* arg_b, const char* op);

}  // namespace ops
}  // namespace effx
