// effx: checks and allocation shared by the cache-attention ops (see attention_args.h).
#include "attention_args.h"

#include "checks.h"

namespace effx {
namespace ops {

at::Tensor with_contiguous_rows(const at::Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

Strided strided(const at::Tensor& t) {
  return Strided{t.const_data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

void check_storage(const char* op, const char* arg, const at::Tensor& t, at::IntArrayRef sizes,
                   at::ScalarType dtype, const at::Tensor& like) {
  EFFX_CHECK(t.sizes() == sizes, op, arg, " must have shape ", sizes, ", got ", t.sizes());
  EFFX_CHECK(t.scalar_type() == dtype, op, arg, " must be ", describe(dtype), ", got ",
             describe(t.scalar_type()));
  check_same_device(like, "q", t, arg, op);
  EFFX_CHECK(t.is_contiguous(), op, arg, " must be contiguous (it is cache storage)");
}

namespace {

void check_index_vector(const char* op, const char* arg, const at::Tensor& t, int64_t batch,
                        const at::Tensor& q) {
  EFFX_CHECK(t.scalar_type() == at::kLong, op, arg, " must be int64, got ", describe(t.scalar_type()));
  EFFX_CHECK(t.dim() == 1 && t.size(0) == batch, op, arg, " must have shape [", batch,
             "] (one entry per batch row), got ", t.sizes());
  check_same_device(q, "q", t, arg, op);
}


DenseKV dense_kv(const char* op, const AttentionCall& c, const at::Tensor& k_cache,
                 const at::Tensor& v_cache) {
  const AttentionArgs& a = c.args;
  for (auto [t, name] : {std::pair{&k_cache, "k_cache"}, std::pair{&v_cache, "v_cache"}}) {
    EFFX_CHECK(t->dim() == 4 && t->size(0) == a.batch && t->size(1) == a.kv_heads &&
                   t->size(3) == a.head_dim,
               op, name, " must have shape [", a.batch, ", ", a.kv_heads, ", capacity, ", a.head_dim,
               "], got ", t->sizes());
    EFFX_CHECK(t->scalar_type() == c.q.scalar_type(), op, name, " must have the dtype of q (",
               describe(c.q.scalar_type()), "), got ", describe(t->scalar_type()));
    check_same_device(c.q, "q", *t, name, op);
  }
  EFFX_CHECK(v_cache.sizes() == k_cache.sizes(), op, "v_cache must have the shape of k_cache (",
             k_cache.sizes(), "), got ", v_cache.sizes());
  EFFX_CHECK(v_cache.strides() == k_cache.strides() && k_cache.stride(3) == 1, op,
             "k_cache and v_cache must share strides with a contiguous head_dim, got ",
             k_cache.strides(), " and ", v_cache.strides());
  return DenseKV{k_cache.const_data_ptr(), v_cache.const_data_ptr(), k_cache.stride(0),
                 k_cache.stride(1), k_cache.stride(2)};
}

}  // namespace

AttentionCall prepare_attention(const char* op, const at::Tensor& q_in, const at::Tensor& k_in,
                                const at::Tensor& v_in, const at::Tensor& lengths,
                                const std::optional<at::Tensor>& new_lengths,
                                const std::optional<at::Tensor>& parents, bool causal,
                                double sm_scale, int64_t capacity, int64_t window) {
  EFFX_CHECK(q_in.dim() == 4, op, "q must be 4-D [batch, q_heads, tokens, head_dim], got shape ",
             q_in.sizes());
  EFFX_CHECK(window >= 0, op, "window must be >= 0 (0: no sliding window), got ", window);
  EFFX_CHECK(window == 0 || causal, op, "a sliding window needs causal attention (causal=True)");
  // A tree no deeper than the window never hides one of its nodes from another: the kernels
  // apply the window to cached tokens only, at each node's depth.
  EFFX_CHECK(window == 0 || !parents || q_in.size(2) <= window, op,
             "a token tree with a sliding window must have at most window (", window, ") tokens, got ",
             q_in.size(2));
  EFFX_CHECK(q_in.numel() > 0, op, "q must be non-empty, got shape ", q_in.sizes());
  AttentionCall c;
  c.dtype = float_dtype(q_in, op, "q");
  const int64_t B = q_in.size(0), Hq = q_in.size(1), Tq = q_in.size(2), D = q_in.size(3);
  for (auto [t, name] : {std::pair{&k_in, "k_new"}, std::pair{&v_in, "v_new"}}) {
    EFFX_CHECK(t->dim() == 4 && t->size(0) == B && t->size(2) == Tq && t->size(3) == D, op, name,
               " must have shape [", B, ", kv_heads, ", Tq, ", ", D, "], got ", t->sizes());
    EFFX_CHECK(t->scalar_type() == q_in.scalar_type(), op, name, " must have the dtype of q (",
               describe(q_in.scalar_type()), "), got ", describe(t->scalar_type()));
    check_same_device(q_in, "q", *t, name, op);
  }
  const int64_t Hkv = k_in.size(1);
  EFFX_CHECK(v_in.size(1) == Hkv, op, "v_new must have the kv heads of k_new (", Hkv, "), got ",
             v_in.size(1));
  EFFX_CHECK(Hkv > 0 && Hq % Hkv == 0, op, "q heads (", Hq, ") must be a multiple of kv heads (",
             Hkv, ")");
  check_index_vector(op, "lengths", lengths, B, q_in);
  c.lengths = lengths;  // may be a strided view into a cache's state: read in place
  if (new_lengths) {
    check_index_vector(op, "new_lengths", *new_lengths, B, q_in);
    c.new_lengths = new_lengths->contiguous();
  }
  if (parents) {
    const at::Tensor& p = *parents;
    EFFX_CHECK(p.scalar_type() == at::kLong, op, "parents must be int64, got ", describe(p.scalar_type()));
    EFFX_CHECK((p.dim() == 1 && p.size(0) == Tq) || (p.dim() == 2 && p.size(0) == B && p.size(1) == Tq),
               op, "parents must have shape [", Tq, "] or [", B, ", ", Tq, "], got ", p.sizes());
    check_same_device(q_in, "q", p, "parents", op);
    c.parents = p.contiguous();
  }
  // Values the kernels trust are checked here when they live on the host; on a GPU this
  // would cost a synchronization per call, so the Python caches check them once per step.
  if (q_in.device().is_cpu()) {
    const auto len = c.lengths.accessor<int64_t, 1>();
    const int64_t* nl = c.new_lengths.defined() ? c.new_lengths.const_data_ptr<int64_t>() : nullptr;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t added = nl ? nl[b] : Tq;
      EFFX_CHECK(nl == nullptr || (added >= 0 && added <= Tq), op, "new_lengths[", b,
                 "] must be in [0, ", Tq, "], got ", added);
      // New tokens are read from k_new / v_new, not from the cache: only the cached tokens must
      // fit (callers that store the new tokens afterwards check their own capacity).
      EFFX_CHECK(len[b] >= 0 && len[b] <= capacity, op, "lengths[", b, "] (", len[b],
                 ") must not exceed the cache capacity (", capacity, ")");
    }
    if (c.parents.defined()) {
      const int64_t* par = c.parents.const_data_ptr<int64_t>();
      for (int64_t k = 0; k < c.parents.numel(); ++k) {
        const int64_t i = k % Tq;
        EFFX_CHECK(par[k] >= -1 && par[k] < i, op, "parents[", i, "] must be in [-1, ", i,
                   ") (a node's parent comes before it), got ", par[k]);
      }
    }
  }

  c.q = with_contiguous_rows(q_in);
  c.k_new = with_contiguous_rows(k_in);
  c.v_new = with_contiguous_rows(v_in);
  c.out = at::empty({B, Hq, Tq, D}, q_in.options());
  c.lse = at::empty({B, Hq, Tq}, q_in.options().dtype(at::kFloat));
  AttentionArgs& a = c.args;
  a.batch = B;
  a.q_heads = Hq;
  a.kv_heads = Hkv;
  a.q_len = Tq;
  a.head_dim = D;
  a.q = strided(c.q);
  a.k_new = strided(c.k_new);
  a.v_new = strided(c.v_new);
  a.out = c.out.data_ptr();
  a.lse = c.lse.data_ptr<float>();
  a.lengths = c.lengths.const_data_ptr<int64_t>();
  a.lengths_stride = c.lengths.stride(0);
  a.new_lengths = c.new_lengths.defined() ? c.new_lengths.const_data_ptr<int64_t>() : nullptr;
  a.parents = c.parents.defined() ? c.parents.const_data_ptr<int64_t>() : nullptr;
  a.parents_sb = c.parents.defined() && c.parents.dim() == 2 ? Tq : 0;
  a.causal = causal;
  a.sm_scale = static_cast<float>(sm_scale);
  a.max_cached = capacity;
  a.scores = nullptr;
  a.window = window;
  return c;
}

DenseAttentionCall prepare_dense_attention(const char* op, const at::Tensor& q, const at::Tensor& k_new,
                                           const at::Tensor& v_new, const at::Tensor& k_cache,
                                           const at::Tensor& v_cache, const at::Tensor& lengths,
                                           const std::optional<at::Tensor>& new_lengths,
                                           const std::optional<at::Tensor>& parents, bool causal,
                                           double sm_scale, int64_t window) {
  EFFX_CHECK(k_cache.dim() == 4, op, "k_cache must be 4-D [batch, kv_heads, capacity, head_dim], got shape ",
             k_cache.sizes());
  DenseAttentionCall d{prepare_attention(op, q, k_new, v_new, lengths, new_lengths, parents, causal, sm_scale,
                                         k_cache.size(2), window),
                       {}};
  d.kv = dense_kv(op, d.call, k_cache, v_cache);
  return d;
}

}  // namespace ops
}  // namespace effx
