// effx C++ benchmark: tree attention on the CPU engine, torch-free: a 64-token random tree over
// a 16k-token prefix (8 kv-heads, 32 query heads, head_dim 128, fp32) against a one-token
// decode attention over the same prefix; and greedy tree verification (vocabulary 32k).
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
  return 0;
}
