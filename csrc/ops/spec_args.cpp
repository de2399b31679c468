// effx family: tree speculative decoding, checks and allocation (see spec_args.h).
#include "spec_args.h"

#include "checks.h"

namespace effx {
namespace ops {

TreeCall prepare_tree(const char* op, const at::Tensor& tokens, const at::Tensor& parents, int64_t vocab) {
  EFFX_CHECK(tokens.scalar_type() == at::kLong, op, "tokens must be int64, got ", describe(tokens.scalar_type()));
  EFFX_CHECK(tokens.dim() == 2 && tokens.size(1) > 0, op,
             "tokens must be 2-D [batch, nodes] with nodes >= 1, got shape ", tokens.sizes());
  const int64_t B = tokens.size(0), N = tokens.size(1);
  EFFX_CHECK(parents.scalar_type() == at::kLong, op, "parents must be int64, got ", describe(parents.scalar_type()));
  EFFX_CHECK((parents.dim() == 1 && parents.size(0) == N) ||
                 (parents.dim() == 2 && parents.size(0) == B && parents.size(1) == N),
             op, "parents must have shape [", N, "] or [", B, ", ", N, "] (one parent per node), got ",
             parents.sizes());
  check_same_device(tokens, "tokens", parents, "parents", op);
  TreeCall c;
  c.tokens = tokens.contiguous();
  c.parents = parents.contiguous();
  const int64_t V = vocab;
  // Device-resident trees are checked by the Python wrappers once per step; reading them here
  // would synchronize. The kernels' walks only move to higher indices, so they always end.
  if (tokens.device().is_cpu()) {
    const int64_t* par = c.parents.const_data_ptr<int64_t>();
    for (int64_t k = 0; k < c.parents.numel(); ++k) {
      const int64_t i = k % N;
      EFFX_CHECK(par[k] >= -1 && par[k] < i, op, "parents[", i, "] must be in [-1, ", i,
                 ") (a node's parent comes before it), got ", par[k]);
    }
    const int64_t* tok = c.tokens.const_data_ptr<int64_t>();
    for (int64_t k = 0; k < c.tokens.numel(); ++k) {
      EFFX_CHECK(V == 0 || tok[k] < V, op, "tokens must be < vocab (", V, ") or negative for an empty node, got ", tok[k],
                 " at node ", k % N, " of row ", k / N);
    }
  }
  const auto idx = tokens.options().dtype(at::kLong);
  c.accepted = at::empty({B, N}, idx);
  c.num_accepted = at::empty({B}, idx);
  c.bonus = at::empty({B}, idx);
  TreeArgs& a = c.args;
  a.batch = B;
  a.nodes = N;
  a.vocab = V;
  a.tokens = c.tokens.const_data_ptr<int64_t>();
  a.parents = c.parents.const_data_ptr<int64_t>();
  a.parents_sb = c.parents.dim() == 2 ? N : 0;
  a.accepted = c.accepted.data_ptr<int64_t>();
  a.num_accepted = c.num_accepted.data_ptr<int64_t>();
  a.bonus = c.bonus.data_ptr<int64_t>();
  return c;
}

at::Tensor node_rows(const char* op, const char* arg, const TreeCall& c, const at::Tensor& t,
                     at::ScalarType dtype) {
  const TreeArgs& a = c.args;
  EFFX_CHECK(t.dim() == 3 && t.size(0) == a.batch && t.size(1) == a.nodes + 1 && t.size(2) == a.vocab, op, arg,
             " must have shape [", a.batch, ", ", a.nodes + 1, ", ", a.vocab,
             "] (row 0 at the root, row i + 1 at node i), got ", t.sizes());
  EFFX_CHECK(t.scalar_type() == dtype, op, arg, " must be ", describe(dtype), ", got ", describe(t.scalar_type()));
  check_same_device(c.tokens, "tokens", t, arg, op);
  return t.contiguous();
}

at::Tensor node_values(const char* op, const char* arg, const TreeCall& c, const at::Tensor& t,
                       at::ScalarType dtype) {
  const TreeArgs& a = c.args;
  EFFX_CHECK(t.dim() == 2 && t.size(0) == a.batch && t.size(1) == a.nodes + 1, op, arg, " must have shape [",
             a.batch, ", ", a.nodes + 1, "] (entry 0 for the root, i + 1 for node i), got ", t.sizes());
  EFFX_CHECK(t.scalar_type() == dtype, op, arg, " must be ", describe(dtype), ", got ", describe(t.scalar_type()));
  check_same_device(c.tokens, "tokens", t, arg, op);
  return t.contiguous();
}

ProbsCall prepare_sampling_probs(const at::Tensor& logits, double temperature, double top_p) {
  constexpr const char* op = "sampling_probs";
  ProbsCall c;
  c.dtype = float_dtype(logits, op, "logits");
  EFFX_CHECK(logits.dim() >= 1 && logits.size(-1) > 0, op, "logits must have a non-empty last dim (the vocabulary), got shape ",
             logits.sizes());
  EFFX_CHECK(temperature > 0.0, op, "temperature must be > 0 (greedy decoding is tree_verify_greedy), got ",
             temperature);
  EFFX_CHECK(top_p > 0.0 && top_p <= 1.0, op, "top_p must be in (0, 1], got ", top_p);
  c.logits = logits.contiguous();
  c.vocab = logits.size(-1);
  c.rows = logits.numel() / c.vocab;
  c.probs = at::empty(logits.sizes(), logits.options().dtype(at::kFloat));
  return c;
}

}  // namespace ops
}  // namespace effx
