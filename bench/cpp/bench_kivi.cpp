// effx C++ benchmark: one decode step of the KIVI-2/4 and dense cache attention CPU kernels,
// torch-free: B = 1, 8 kv-heads, 32 query heads, head_dim 128, T = 8192 cached tokens; and the
// append that fills the cache: a prefill of T tokens and decoding (one token per step, the
// mean over R steps, which quantize R values and one block of R keys). Exits 1 if an append
// leaves a wrong (n, kq, vq) state.
#include <cstdio>
#include <random>
#include <thread>
#include <vector>

#include "effx/kivi.h"
#include "timing.h"

namespace {

constexpr int64_t B = 1, H = 8, HQ = 32, D = 128, T = 8192, R = 128, G = 32, C = T + 64;

effx::AttentionArgs decode_args(std::vector<float>& q, std::vector<float>& kn, std::vector<float>& vn,
                                std::vector<float>& out, const int64_t* lengths, int64_t stride) {
  effx::AttentionArgs a{};
  a.batch = B;
  a.q_heads = HQ;
  a.kv_heads = H;
  a.q_len = 1;
  a.head_dim = D;
  a.q = {q.data(), HQ * D, D, D};
  a.k_new = {kn.data(), H * D, D, D};
  a.v_new = {vn.data(), H * D, D, D};
  a.out = out.data();
  a.lengths = lengths;
  a.lengths_stride = stride;
  a.causal = true;
  a.sm_scale = 0.088f;
  a.max_cached = C;
  return a;
}

}  // namespace

int main() {
  const int threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const double roof = effx_bench::host_copy_gbps();
  std::printf("host copy roof: %.1f GB/s, threads: %d; decode step B=%lld Hkv=%lld Hq=%lld D=%lld T=%lld\n", roof,
              threads, (long long)B, (long long)H, (long long)HQ, (long long)D, (long long)T);
  std::mt19937 rng(0);
  std::normal_distribution<float> dist;
  std::vector<float> q(B * HQ * D), kn(B * H * D), vn(B * H * D), out(B * HQ * D);
  for (auto* v : {&q, &kn, &vn}) for (auto& x : *v) x = dist(rng);

  std::vector<float> k(B * H * C * D), v(k.size());
  for (auto& x : k) x = dist(rng);
  for (auto& x : v) x = dist(rng);
  bool failed = false;
  const int64_t len = T;
  const effx::DenseKV dense{k.data(), v.data(), H * C * D, C * D, D};
  auto a = decode_args(q, kn, vn, out, &len, 1);
  const double t_dense = effx_bench::median_seconds([&] { effx::cpu::dense_attention(a, dense, effx::DType::Float32, threads); });
  const double dense_bytes = 2.0 * B * H * T * D * 4;
  std::printf("%-12s %10.3f ms %8.1f GB/s %6.1f%% of roof\n", "dense fp32", t_dense * 1e3, dense_bytes / t_dense / 1e9,
              100 * dense_bytes / t_dense / 1e9 / roof);

  for (int bits : {2, 4}) {
    std::vector<int32_t> k_codes(B * H * D * C * bits / 32), v_codes(B * H * C * D * bits / 32);
    std::vector<float> k_scale(B * H * D * C / G), k_zero(k_scale.size()), v_scale(B * H * C * D / G),
        v_zero(v_scale.size()), k_res(B * H * D * R), v_res(B * H * R * D);
    std::vector<int64_t> state(B * 3, 0);
    const effx::KiviStorage s{B, H, D, C, R, bits, static_cast<int>(G), k_codes.data(), k_scale.data(), k_zero.data(),
                              v_codes.data(), v_scale.data(), v_zero.data(), k_res.data(), v_res.data(), state.data()};
    const effx::Strided ks{k.data(), H * C * D, C * D, D}, vs{v.data(), H * C * D, C * D, D};
    effx::cpu::kivi_append(s, effx::DType::Float32, ks, vs, T, nullptr, threads);
    auto ka = decode_args(q, kn, vn, out, state.data(), 3);
    const double t = effx_bench::median_seconds([&] { effx::cpu::kivi_attention(ka, s, effx::DType::Float32, threads); });
    const double bytes = (k_codes.size() + v_codes.size()) * 4.0 * T / C + (k_scale.size() + v_scale.size()) * 8.0 * T / C;
    std::printf("kivi-%d      %10.3f ms %8.1f GB/s %6.1f%% of roof, %.2fx dense time\n", bits, t * 1e3, bytes / t / 1e9,
                100 * bytes / t / 1e9 / roof, t / t_dense);

    // Appends (the attention above is done with this storage). Prefill: T tokens into an
    // empty cache, GB/s on the fp32 K/V read. Decode: R single-token appends from n0 = T - 64
    // (prefilled untimed) to T + 64 = C, crossing one key-block boundary.
    auto expect_state = [&](int64_t n, int64_t kq, int64_t vq, const char* what) {
      if (state[0] == n && state[1] == kq && state[2] == vq) return;
      std::printf("CHECK FAILED: kivi-%d %s: state (%lld, %lld, %lld), expected (%lld, %lld, %lld)\n", bits, what,
                  (long long)state[0], (long long)state[1], (long long)state[2], (long long)n, (long long)kq,
                  (long long)vq);
      failed = true;
    };
    auto empty = [&] { std::fill(state.begin(), state.end(), 0); };
    auto prefill = [&](int64_t n) { effx::cpu::kivi_append(s, effx::DType::Float32, ks, vs, n, nullptr, threads); };
    const double t_prefill = effx_bench::median_seconds_after(empty, [&] { prefill(T); }, 1, 5);
    expect_state(T, T - T % R, T - R, "prefill");
    const int64_t n0 = T - 64;
    auto decode_steps = [&] {
      for (int64_t i = 0; i < R; ++i) {
        const effx::Strided kt{k.data() + (n0 + i) * D, H * C * D, C * D, D}, vt{v.data() + (n0 + i) * D, H * C * D, C * D, D};
        effx::cpu::kivi_append(s, effx::DType::Float32, kt, vt, 1, nullptr, threads);
      }
    };
    const double t_steps = effx_bench::median_seconds_after([&] { empty(); prefill(n0); }, decode_steps, 1, 3);
    expect_state(n0 + R, (n0 + R) - (n0 + R) % R, n0, "decode appends");
    const double kv_in = 2.0 * B * H * T * D * 4;
    std::printf("kivi-%d append: prefill %lld tokens %.3f ms (%.1f GB/s of fp32 K/V), decode %.4f ms per token\n", bits,
                (long long)T, t_prefill * 1e3, kv_in / t_prefill / 1e9, t_steps / R * 1e3);
  }
  return failed ? 1 : 0;
}
