// effx family: KIVI, storage checks (see kivi_args.h).
#include "kivi_args.h"

#include "attention_args.h"
#include "checks.h"

namespace effx {
namespace ops {

namespace {

void check_kivi_geometry(const char* op, int64_t bits, int64_t G, int64_t D, int64_t R, int64_t C) {
  EFFX_CHECK(bits == 2 || bits == 4, op, "bits must be 2 or 4, got ", bits);
  EFFX_CHECK(G >= 1 && G * bits % 32 == 0, op, "group_size must be a positive multiple of ",
             32 / bits, " at ", bits, " bits (groups fill whole int32 words), got ", G);
  EFFX_CHECK(D % G == 0, op, "group_size must divide head_dim (", D, "), got ", G);
  EFFX_CHECK(R >= G && R % G == 0, op, "residual must be a positive multiple of group_size (", G,
             "), got ", R);
  EFFX_CHECK(C % G == 0, op, "capacity must be a multiple of group_size (", G, "), got ", C);
}

}  // namespace

KiviStorage kivi_storage(const char* op, const at::Tensor& k_codes, const at::Tensor& k_scale,
                         const at::Tensor& k_zero, const at::Tensor& v_codes,
                         const at::Tensor& v_scale, const at::Tensor& v_zero,
                         const at::Tensor& k_res, const at::Tensor& v_res,
                         const at::Tensor& state, int64_t bits, int64_t group_size,
                         const at::Tensor& like) {
  EFFX_CHECK(k_res.dim() == 4, op, "k_res must be 4-D [batch, kv_heads, head_dim, residual], got shape ",
             k_res.sizes());
  EFFX_CHECK(v_codes.dim() == 4, op, "v_codes must be 4-D [batch, kv_heads, capacity, words], got shape ",
             v_codes.sizes());
  const int64_t B = k_res.size(0), H = k_res.size(1), D = k_res.size(2), R = k_res.size(3);
  const int64_t C = v_codes.size(2), G = group_size;
  check_kivi_geometry(op, bits, G, D, R, C);
  const at::ScalarType dt = like.scalar_type();
  check_storage(op, "k_res", k_res, {B, H, D, R}, dt, like);
  check_storage(op, "v_res", v_res, {B, H, R, D}, dt, like);
  check_storage(op, "k_codes", k_codes, {B, H, D, C * bits / 32}, at::kInt, like);
  check_storage(op, "k_scale", k_scale, {B, H, D, C / G}, dt, like);
  check_storage(op, "k_zero", k_zero, {B, H, D, C / G}, dt, like);
  check_storage(op, "v_codes", v_codes, {B, H, C, D * bits / 32}, at::kInt, like);
  check_storage(op, "v_scale", v_scale, {B, H, C, D / G}, dt, like);
  check_storage(op, "v_zero", v_zero, {B, H, C, D / G}, dt, like);
  check_storage(op, "state", state, {B, 3}, at::kLong, like);
  return KiviStorage{B, H, D, C, R, static_cast<int>(bits), static_cast<int>(G),
                     k_codes.data_ptr<int32_t>(), k_scale.data_ptr(), k_zero.data_ptr(),
                     v_codes.data_ptr<int32_t>(), v_scale.data_ptr(), v_zero.data_ptr(),
                     k_res.data_ptr(), v_res.data_ptr(), state.data_ptr<int64_t>()};
}

void check_kivi_append(const KiviStorage& s, const at::Tensor& k_new, const at::Tensor& v_new,
                       const at::Tensor& state, const std::optional<at::Tensor>& new_lengths,
                       const at::Tensor& k_res) {
  constexpr const char* op = "kivi_append_";
  for (auto [t, name] : {std::pair{&k_new, "k_new"}, std::pair{&v_new, "v_new"}}) {
    EFFX_CHECK(t->dim() == 4 && t->size(0) == s.batch && t->size(1) == s.heads &&
                   t->size(3) == s.head_dim,
               op, name, " must have shape [", s.batch, ", ", s.heads, ", tokens, ", s.head_dim,
               "], got ", t->sizes());
    EFFX_CHECK(t->scalar_type() == k_res.scalar_type(), op, name, " must have the cache dtype (",
               describe(k_res.scalar_type()), "), got ", describe(t->scalar_type()));
    check_same_device(k_res, "the cache", *t, name, op);
  }
  EFFX_CHECK(v_new.size(2) == k_new.size(2), op, "v_new must have the tokens of k_new (",
             k_new.size(2), "), got ", v_new.size(2));
  if (new_lengths) {
    const at::Tensor& t = *new_lengths;
    EFFX_CHECK(t.scalar_type() == at::kLong && t.dim() == 1 && t.size(0) == s.batch, op,
               "new_lengths must be int64 of shape [", s.batch, "], got ",
               describe(t.scalar_type()), " ", t.sizes());
    check_same_device(k_res, "the cache", t, "new_lengths", op);
  }
  if (state.device().is_cpu()) {
    const at::Tensor nl = new_lengths ? new_lengths->contiguous() : at::Tensor();
    for (int64_t b = 0; b < s.batch; ++b) {
      const int64_t added = nl.defined() ? nl.const_data_ptr<int64_t>()[b] : k_new.size(2);
      const int64_t n = s.state[b * 3];
      EFFX_CHECK(added >= 0 && added <= k_new.size(2), op, "new_lengths[", b, "] must be in [0, ",
                 k_new.size(2), "], got ", added);
      EFFX_CHECK(n >= 0 && n + added <= s.capacity, op, "lengths[", b, "] + new tokens (", n, " + ",
                 added, ") must not exceed the cache capacity (", s.capacity, ")");
    }
  }
}

}  // namespace ops
}  // namespace effx
