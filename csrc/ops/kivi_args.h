// effx family: KIVI. Checks of the cache storage tensors shared by the CPU and CUDA ops
// (layout in include/effx/kivi.h).
#pragma once

#include <ATen/ATen.h>

#include "effx/kivi.h"

namespace effx {
namespace ops {

// Validates the eight storage tensors against each other and against `like` (dtype of the
// full-precision parts, device) and returns the kernel view of them.
KiviStorage kivi_storage(const char* op, const at::Tensor& k_codes, const at::Tensor& k_scale,
                         const at::Tensor& k_zero, const at::Tensor& v_codes,
                         const at::Tensor& v_scale, const at::Tensor& v_zero,
                         const at::Tensor& k_res, const at::Tensor& v_res,
                         const at::Tensor& state, int64_t bits, int64_t group_size,
                         const at::Tensor& like);

// Checks of kivi_append_'s new tokens and new_lengths against the storage.
void check_kivi_append(const KiviStorage& s, const at::Tensor& k_new, const at::Tensor& v_new,
                       const at::Tensor& state, const std::optional<at::Tensor>& new_lengths,
                       const at::Tensor& k_res);

}  // namespace ops
}  // namespace effx
