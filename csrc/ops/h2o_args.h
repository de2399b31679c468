// effx family: H2O. Checks shared by the CPU and CUDA ops (layout in include/effx/h2o.h).
#pragma once

#include <ATen/ATen.h>

#include "attention_args.h"
#include "effx/h2o.h"

namespace effx {
namespace ops {

// Sets the call's score output after checking scores [B, Hkv, capacity] fp32 contiguous.
void attach_scores(const char* op, AttentionCall& c, const at::Tensor& scores, int64_t capacity);

H2OStorage h2o_storage(const char* op, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& scores, const at::Tensor& positions, const at::Tensor& state,
                       int64_t heavy, int64_t recent);

}  // namespace ops
}  // namespace effx
