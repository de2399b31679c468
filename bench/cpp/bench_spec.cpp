// effx C++ benchmark: tree attention on the CPU engine, torch-free: a 64-token random tree over
// a 16k-token prefix (8 kv-heads, 32 query heads, head_dim 128, fp32) against a one-token
// decode attention over the same prefix; and tree verification (vocabulary 32k): greedy,
// SpecExec matching, exact multi-draft sampling, and the top-p sampling distribution it takes.
// Checks (exit 1 on failure): sampling rows sum to 1, and matching and sampling with p == q
// accept exactly the first-child path to a leaf.
#include <cmath>
#include <cstdio>
#include <random>
#include <thread>
#include <vector>

#include "effx/attention.h"
#include "effx/spec.h"
#include "timing.h"

namespace {

constexpr int64_t H = 8, HQ = 32, D = 128, P = 16384, N = 64, V = 32000;

effx::AttentionArgs args(int64_t n, std::vector<float>& q, std::vector<float>& kn, std::vector<float>& vn,
                         std::vector<float>& out, const int64_t* lengths, const int64_t* parents) {
  effx::AttentionArgs a{};
  a.batch = 1;
  a.q_heads = HQ;
  a.kv_heads = H;
  a.q_len = n;
  a.head_dim = D;
  a.q = {q.data(), HQ * n * D, n * D, D};
  a.k_new = {kn.data(), H * n * D, n * D, D};
  a.v_new = {vn.data(), H * n * D, n * D, D};
  a.out = out.data();
  a.lengths = lengths;
  a.lengths_stride = 1;
  a.parents = parents;
  a.causal = true;
  a.sm_scale = 0.088f;
  a.max_cached = P;
  return a;
}

}  // namespace

int main() {
  const int threads = static_cast<int>(std::thread::hardware_concurrency());
  std::mt19937 rng(0);
  std::normal_distribution<float> nd;
  std::vector<float> k(H * P * D), v(H * P * D);
  for (auto& x : k) x = nd(rng);
  for (auto& x : v) x = nd(rng);
  std::vector<float> q(HQ * N * D), kn(H * N * D), vn(H * N * D), out(HQ * N * D);
  for (auto& x : q) x = nd(rng);
  for (auto& x : kn) x = nd(rng);
  for (auto& x : vn) x = nd(rng);
  std::vector<int64_t> parents(N);
  for (int64_t i = 0; i < N; ++i) parents[i] = i == 0 ? -1 : static_cast<int64_t>(rng() % i);
  const int64_t len = P;
  const effx::DenseKV kv{k.data(), v.data(), H * P * D, P * D, D};
  const auto tree = args(N, q, kn, vn, out, &len, parents.data());
  const auto decode = args(1, q, kn, vn, out, &len, nullptr);
  const double t_tree = effx_bench::median_seconds([&] { effx::cpu::dense_attention(tree, kv, effx::DType::Float32, threads); }, 2, 7);
  const double t_dec = effx_bench::median_seconds([&] { effx::cpu::dense_attention(decode, kv, effx::DType::Float32, threads); }, 2, 7);
  std::printf("tree attention N=%lld P=%lld: %.3f ms; one-token decode %.3f ms; ratio %.2fx (%d threads)\n",
              (long long)N, (long long)P, t_tree * 1e3, t_dec * 1e3, t_tree / t_dec, threads);

  std::vector<float> logits((N + 1) * V);
  for (auto& x : logits) x = nd(rng);
  std::vector<int64_t> tokens(N), accepted(N), num(1), bonus(1);
  for (auto& t : tokens) t = rng() % V;
  const effx::TreeArgs ta{1, N, V, tokens.data(), parents.data(), 0, accepted.data(), num.data(), bonus.data()};
  const double t_ver = effx_bench::median_seconds([&] { effx::cpu::verify_greedy(ta, logits.data(), effx::DType::Float32, threads); });
  std::printf("greedy verification N=%lld V=%lld: %.3f ms\n", (long long)N, (long long)V, t_ver * 1e3);

  // Distinct tokens, so that exactly one child of a node can match a target token.
  for (int64_t i = 0; i < N; ++i) tokens[i] = (i * 7919 + 3) % V;
  std::vector<int64_t> chain;  // from the root, always the lowest-index child, to a leaf
  for (int64_t node = -1;;) {
    int64_t child = -1;
    for (int64_t i = 0; i < N && child < 0; ++i) if (parents[i] == node) child = i;
    if (child < 0) break;
    chain.push_back(child);
    node = child;
  }
  bool failed = false;
  auto expect_chain = [&](const char* what, int64_t want_bonus) {
    bool ok = num[0] == static_cast<int64_t>(chain.size()) && (want_bonus < 0 || bonus[0] == want_bonus) &&
              bonus[0] >= 0 && bonus[0] < V;
    for (size_t i = 0; ok && i < chain.size(); ++i) ok = accepted[i] == chain[i];
    if (!ok) {
      std::printf("CHECK FAILED: %s accepted %lld nodes (bonus %lld), expected the %zu-node first-child path\n", what,
                  (long long)num[0], (long long)bonus[0], chain.size());
      failed = true;
    }
  };

  std::vector<float> target(logits.size()), draft(logits.size()), uniforms(N + 1);
  const double t_probs = effx_bench::median_seconds([&] {
    effx::cpu::sampling_probs(logits.data(), effx::DType::Float32, N + 1, V, 0.8f, 0.9f, target.data(), threads);
  });
  for (int64_t r = 0; r <= N; ++r) {
    double sum = 0;
    for (int64_t j = 0; j < V; ++j) sum += target[r * V + j];
    if (!(std::fabs(sum - 1.0) < 1e-4)) {
      std::printf("CHECK FAILED: sampling_probs row %lld sums to %.8g\n", (long long)r, sum);
      failed = true;
    }
  }
  std::printf("sampling_probs (T=0.8, top-p 0.9) %lld x %lld: %.3f ms\n", (long long)(N + 1), (long long)V, t_probs * 1e3);

  std::vector<int64_t> target_tokens(N + 1, -1);  // a sample no draft token equals
  for (size_t i = 0; i < chain.size(); ++i) target_tokens[i == 0 ? 0 : chain[i - 1] + 1] = tokens[chain[i]];
  target_tokens[chain.back() + 1] = 12345;
  const double t_match = effx_bench::median_seconds([&] { effx::cpu::verify_match(ta, target_tokens.data(), threads); });
  expect_chain("verify_match", 12345);
  std::printf("SpecExec match verification N=%lld: %.4f ms\n", (long long)N, t_match * 1e3);

  // Sanity of the sampling verifier: with p == q every child with q(x) > 0 is accepted (no
  // top-p, so every token has mass), so the first child wins at every node.
  for (auto& u : uniforms) u = std::uniform_real_distribution<float>(0.0f, 1.0f)(rng);
  effx::cpu::sampling_probs(logits.data(), effx::DType::Float32, N + 1, V, 1.0f, 1.0f, draft.data(), threads);
  effx::cpu::verify_sample(ta, draft.data(), draft.data(), uniforms.data(), threads);
  expect_chain("verify_sample with p == q", -1);
  // Timed: a target and a draft that differ (the draft's logits are a noisy copy).
  std::vector<float> draft_logits(logits.size());
  for (size_t i = 0; i < logits.size(); ++i) draft_logits[i] = logits[i] + nd(rng);
  effx::cpu::sampling_probs(draft_logits.data(), effx::DType::Float32, N + 1, V, 0.8f, 0.9f, draft.data(), threads);
  const double t_sample = effx_bench::median_seconds([&] {
    effx::cpu::verify_sample(ta, target.data(), draft.data(), uniforms.data(), threads);
  });
  std::printf("multi-draft sampling verification N=%lld V=%lld: %.3f ms (accepted %lld)\n", (long long)N, (long long)V,
              t_sample * 1e3, (long long)num[0]);
  return failed ? 1 : 0;
}
