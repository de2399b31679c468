// effx C++ test: tree speculative decoding CPU kernels (include/effx/spec.h), torch-free. A
// hand-made tree whose accepted paths are known, the all-zero-residual fallback, and top-p.
#include <cmath>
#include <vector>

#include "check.h"
#include "effx/spec.h"

namespace {

struct Result {
  std::vector<int64_t> accepted, num, bonus;
  effx::TreeArgs args(int64_t B, int64_t N, int64_t V, const int64_t* tokens, const int64_t* parents, int64_t psb) {
    accepted.assign(B * N, 0);
    num.assign(B, 0);
    bonus.assign(B, 0);
    return effx::TreeArgs{B, N, V, tokens, parents, psb, accepted.data(), num.data(), bonus.data()};
  }
};

}  // namespace

int main() {
  // Tree: 0, 1 children of the root; 2, 3 children of 1; 4 child of 3. Vocabulary 5.
  const int64_t N = 5, V = 5;
  const std::vector<int64_t> parents{-1, -1, 1, 1, 3};
  const std::vector<int64_t> tokens{2, 4, 0, 1, 3};
  // Target argmax per row (root, nodes 0..4): 4 at the root -> node 1; 1 at node 1 -> node 3;
  // 3 at node 3 -> node 4; 2 at node 4 -> bonus 2.
  const int64_t argmax[N + 1] = {4, 0, 1, 0, 3, 2};
  std::vector<float> logits((N + 1) * V, 0.0f);
  for (int64_t r = 0; r <= N; ++r) logits[r * V + argmax[r]] = 1.0f;
  Result g;
  effx::cpu::verify_greedy(g.args(1, N, V, tokens.data(), parents.data(), 0), logits.data(), effx::DType::Float32, 2);
  EFFX_EXPECT(g.num[0] == 3 && g.accepted[0] == 1 && g.accepted[1] == 3 && g.accepted[2] == 4 && g.accepted[3] == -1,
              "greedy path %lld: %lld %lld %lld", (long long)g.num[0], (long long)g.accepted[0],
              (long long)g.accepted[1], (long long)g.accepted[2]);
  EFFX_EXPECT(g.bonus[0] == 2, "greedy bonus %lld", (long long)g.bonus[0]);

  std::vector<int64_t> samples(argmax, argmax + N + 1);
  samples[2] = 0;  // node 1 samples 0 -> node 2 (a leaf): bonus = its sample
  Result m;
  effx::cpu::verify_match(m.args(1, N, V, tokens.data(), parents.data(), 0), samples.data(), 2);
  EFFX_EXPECT(m.num[0] == 2 && m.accepted[1] == 2 && m.bonus[0] == argmax[3], "match path %lld bonus %lld",
              (long long)m.num[0], (long long)m.bonus[0]);

  // p == q and u = 1 rejects the only child: no residual, the bonus comes from the original p.
  const std::vector<float> p{0.1f, 0.2f, 0.3f, 0.4f, 0.0f};
  std::vector<float> rows(2 * V);
  for (int r = 0; r < 2; ++r) std::copy(p.begin(), p.end(), rows.begin() + r * V);
  const std::vector<int64_t> one_token{2}, one_parent{-1};
  const float u[2] = {0.55f, 1.0f};
  Result s;
  effx::cpu::verify_sample(s.args(1, 1, V, one_token.data(), one_parent.data(), 0), rows.data(), rows.data(), u, 1);
  EFFX_EXPECT(s.num[0] == 0 && s.bonus[0] == 2, "fallback: %lld accepted, bonus %lld", (long long)s.num[0],
              (long long)s.bonus[0]);

  // top-p 0.5 over probabilities (0.4, 0.3, 0.2, 0.1): keeps 0.4 and 0.3, renormalized.
  const std::vector<float> lg{std::log(0.4f), std::log(0.3f), std::log(0.2f), std::log(0.1f)};
  std::vector<float> out(4);
  effx::cpu::sampling_probs(lg.data(), effx::DType::Float32, 1, 4, 1.0f, 0.5f, out.data(), 1);
  EFFX_EXPECT(std::fabs(out[0] - 4.0f / 7) < 1e-6f && std::fabs(out[1] - 3.0f / 7) < 1e-6f && out[2] == 0.0f &&
                  out[3] == 0.0f,
              "top-p: %g %g %g %g", out[0], out[1], out[2], out[3]);
  return 0;
}
