// effx family: KIVI 2/4-bit KV cache, CPU operator implementations.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "attention_args.h"
#include "checks.h"
#include "kivi_args.h"

namespace effx {
namespace ops {
namespace {

std::tuple<at::Tensor, at::Tensor> kivi_attention_cpu(
    const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new, const at::Tensor& k_codes,
    const at::Tensor& k_scale, const at::Tensor& k_zero, const at::Tensor& v_codes,
    const at::Tensor& v_scale, const at::Tensor& v_zero, const at::Tensor& k_res,
    const at::Tensor& v_res, const at::Tensor& state, const std::optional<at::Tensor>& new_lengths,
    const std::optional<at::Tensor>& parents, int64_t bits, int64_t group_size, bool causal,
    double sm_scale, int64_t window) {
  constexpr const char* op = "kivi_attention";
  const KiviStorage s = kivi_storage(op, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_res,
                                     v_res, state, bits, group_size, q);
  AttentionCall c = prepare_attention(op, q, k_new, v_new, state.select(1, 0), new_lengths, parents,
                                      causal, sm_scale, s.capacity, window);
  TORCH_CHECK(c.args.kv_heads == s.heads && c.args.head_dim == s.head_dim && c.args.batch == s.batch,
              "effx.kivi_attention: k_new must have shape [", s.batch, ", ", s.heads, ", tokens, ",
              s.head_dim, "] like the cache, got ", k_new.sizes());
  cpu::kivi_attention(c.args, s, c.dtype, at::get_num_threads());
  return {c.out, c.lse};
}

void kivi_append_cpu(const at::Tensor& k_new, const at::Tensor& v_new, const at::Tensor& k_codes,
                     const at::Tensor& k_scale, const at::Tensor& k_zero, const at::Tensor& v_codes,
                     const at::Tensor& v_scale, const at::Tensor& v_zero, const at::Tensor& k_res,
                     const at::Tensor& v_res, const at::Tensor& state,
                     const std::optional<at::Tensor>& new_lengths, int64_t bits, int64_t group_size) {
  constexpr const char* op = "kivi_append_";
  const DType dtype = float_dtype(k_res, op, "k_res");
  const KiviStorage s = kivi_storage(op, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_res,
                                     v_res, state, bits, group_size, k_res);
  check_kivi_append(s, k_new, v_new, state, new_lengths, k_res);
  const at::Tensor kn = with_contiguous_rows(k_new), vn = with_contiguous_rows(v_new);
  const at::Tensor nl = new_lengths ? new_lengths->contiguous() : at::Tensor();
  cpu::kivi_append(s, dtype, strided(kn), strided(vn), k_new.size(2),
                   nl.defined() ? nl.const_data_ptr<int64_t>() : nullptr, at::get_num_threads());
}

}  // namespace

TORCH_LIBRARY_IMPL(effx, CPU, m) {
  m.impl("kivi_attention", &kivi_attention_cpu);
  m.impl("kivi_append_", &kivi_append_cpu);
}

}  // namespace ops
}  // namespace effx
