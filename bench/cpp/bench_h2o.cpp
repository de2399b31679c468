// effx C++ benchmark: H2O on the CPU kernels, torch-free. One decode step of dense cache
// attention with and without the heavy-hitter scoring output (AttentionArgs::scores), fp32,
// 8 kv-heads, 32 query heads, head_dim 128: B = 8, T = 8192 cached tokens, and a quick shape
// B = 2, T = 4096. Prints time, GB/s on the K/V bytes read, the fraction of the host copy roof
// and the scoring overhead; then h2o_evict at a 20% budget (heavy = recent = 10% of T): the
// one-time compression of the prompt, the per-step eviction (one token per row and kv-head)
// and the whole H2O decode step at the budget against the full-cache step.
// Checks before timing (exit 1 on failure): the scores of one step sum to group_size * q_len
// per (row, kv-head), output and scores match an fp64 loop on one (row, kv-head), scoring does
// not change the output, and eviction keeps exactly the recent + highest-scoring tokens with
// their K/V rows.
// --quick: the quick shape only; --threads N: thread count (default: all cores).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "effx/h2o.h"
#include "timing.h"

namespace {

constexpr int64_t H = 8, HQ = 32, D = 128, GROUP = HQ / H;

// Deterministic values in [-1, 1) from an index (so K/V rows can be recognized after moves).
float hval(uint64_t i) {
  i += 0x9e3779b97f4a7c15ull;
  i = (i ^ (i >> 30)) * 0xbf58476d1ce4e5b9ull;
  i = (i ^ (i >> 27)) * 0x94d049bb133111ebull;
  i ^= i >> 31;
  return static_cast<float>(i >> 40) * (2.0f / 16777216.0f) - 1.0f;
}

constexpr uint64_t kSeedK = 1ull << 40, kSeedV = 2ull << 40;

int failures = 0;

void fail(const char* fmt, double a, double b, long long i, long long j) {
  if (++failures > 10) return;
  std::printf("CHECK FAILED: ");
  std::printf(fmt, a, b, i, j);
  std::printf("\n");
}

void run_shape(int64_t B, int64_t T, int threads, double roof) {
  const int64_t C = T + 64;
  const double kv_bytes = 2.0 * B * H * T * D * sizeof(float);
  std::printf("\nB=%lld Hkv=%lld Hq=%lld D=%lld T=%lld fp32, K/V %.0f MB\n", (long long)B, (long long)H,
              (long long)HQ, (long long)D, (long long)T, kv_bytes / 1e6);
  // K and V of slot t hold the values of token t (K/V index = ((b*H + h)*C + t)*D + d).
  std::vector<float> k(B * H * C * D), v(k.size());
  for (size_t i = 0; i < k.size(); ++i) {
    k[i] = hval(kSeedK + i);
    v[i] = hval(kSeedV + i);
  }
  std::vector<float> q(B * HQ * D), kn(B * H * D), vn(B * H * D), out(B * HQ * D), out_plain(out.size());
  for (size_t i = 0; i < q.size(); ++i) q[i] = 3.0f * hval(3 * (uint64_t{1} << 40) + i);  // peakier softmax
  for (size_t i = 0; i < kn.size(); ++i) kn[i] = hval((uint64_t{4} << 40) + i), vn[i] = hval((uint64_t{5} << 40) + i);
  std::vector<int64_t> lengths(B, T);
  std::vector<float> scores(B * H * C, 0.0f);

  effx::AttentionArgs a{};
  a.batch = B;
  a.q_heads = HQ;
  a.kv_heads = H;
  a.q_len = 1;
  a.head_dim = D;
  a.q = {q.data(), HQ * D, D, D};
  a.k_new = {kn.data(), H * D, D, D};
  a.v_new = {vn.data(), H * D, D, D};
  a.out = out_plain.data();
  a.lengths = lengths.data();
  a.lengths_stride = 1;
  a.causal = true;
  a.sm_scale = 1.0f / std::sqrt(float(D));
  a.max_cached = C;
  const effx::DenseKV kv{k.data(), v.data(), H * C * D, C * D, D};
  effx::AttentionArgs as = a;
  as.out = out.data();
  as.scores = scores.data();
  as.scores_sb = H * C;
  as.scores_sh = C;

  // --- checks of one step (scores start at zero)
  effx::cpu::dense_attention(a, kv, effx::DType::Float32, threads);
  effx::cpu::dense_attention(as, kv, effx::DType::Float32, threads);
  for (size_t i = 0; i < out.size(); ++i)
    if (!(std::fabs(out[i] - out_plain[i]) <= 1e-6f))
      fail("output with scores %.8g != without %.8g at %lld (%lld)", out[i], out_plain[i], (long long)i, 0);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      double sum = 0;
      bool sane = true;
      for (int64_t t = 0; t <= T; ++t) {
        const float s = scores[(b * H + h) * C + t];
        sane = sane && std::isfinite(s) && s >= 0.0f;
        sum += s;
      }
      if (!sane || std::fabs(sum - double(GROUP * a.q_len)) > 1e-4 * GROUP)
        fail("scores of one step sum to %.8g, expected group_size * q_len = %.0f (row %lld, kv-head %lld)", sum,
             double(GROUP * a.q_len), (long long)b, (long long)h);
    }
  }
  {  // fp64 reference on the last (row, kv-head)
    const int64_t b = B - 1, hk = H - 1;
    std::vector<double> ref_scores(T + 1, 0.0), logit(T + 1);
    for (int64_t g = 0; g < GROUP; ++g) {
      const int64_t hq = hk * GROUP + g;
      const float* qr = q.data() + (b * HQ + hq) * D;
      auto key = [&](int64_t t) { return t < T ? k.data() + ((b * H + hk) * C + t) * D : kn.data() + (b * H + hk) * D; };
      auto val = [&](int64_t t) { return t < T ? v.data() + ((b * H + hk) * C + t) * D : vn.data() + (b * H + hk) * D; };
      double mx = -INFINITY, l = 0;
      for (int64_t t = 0; t <= T; ++t) {
        double dot = 0;
        for (int64_t d = 0; d < D; ++d) dot += double(qr[d]) * key(t)[d];
        logit[t] = dot * a.sm_scale;
        mx = std::max(mx, logit[t]);
      }
      for (int64_t t = 0; t <= T; ++t) l += std::exp(logit[t] - mx);
      std::vector<double> o(D, 0.0);
      for (int64_t t = 0; t <= T; ++t) {
        const double p = std::exp(logit[t] - mx) / l;
        ref_scores[t] += p;
        for (int64_t d = 0; d < D; ++d) o[d] += p * val(t)[d];
      }
      for (int64_t d = 0; d < D; ++d) {
        const double got = out[(b * HQ + hq) * D + d];
        if (!(std::fabs(got - o[d]) <= 1e-5)) fail("output %.8g vs fp64 %.8g (head %lld, dim %lld)", got, o[d], hq, d);
      }
    }
    for (int64_t t = 0; t <= T; ++t) {
      const double got = scores[(b * H + hk) * C + t];
      if (!(std::fabs(got - ref_scores[t]) <= 1e-7 + 1e-4 * ref_scores[t]))
        fail("score %.8g vs fp64 %.8g (kv-head %lld, token %lld)", got, ref_scores[t], hk, t);
    }
  }

  // --- decode step timing
  // Plain and scored calls alternate, so that neither gains from running second (at the small
  // shape, back-to-back medians favour whichever runs second by ~5%).
  std::vector<double> tp, ts;
  for (int r = 0; r < 12; ++r) {
    const double p = effx_bench::median_seconds([&] { effx::cpu::dense_attention(a, kv, effx::DType::Float32, threads); }, 0, 1);
    const double s = effx_bench::median_seconds([&] { effx::cpu::dense_attention(as, kv, effx::DType::Float32, threads); }, 0, 1);
    if (r >= 2) tp.push_back(p), ts.push_back(s);  // the first two rounds warm up
  }
  std::nth_element(tp.begin(), tp.begin() + tp.size() / 2, tp.end());
  std::nth_element(ts.begin(), ts.begin() + ts.size() / 2, ts.end());
  const double t_plain = tp[tp.size() / 2], t_score = ts[ts.size() / 2];
  std::printf("%-30s %10s %8s %7s\n", "decode step attention", "ms", "GB/s", "roof%");
  for (auto [name, t] : {std::pair{"plain", t_plain}, std::pair{"with H2O scores", t_score}}) {
    std::printf("  %-28s %10.3f %8.1f %6.1f%%\n", name, t * 1e3, kv_bytes / t / 1e9, 100 * kv_bytes / t / 1e9 / roof);
  }
  std::printf("  scoring overhead: %+.1f%%\n", 100 * (t_score / t_plain - 1));

  // --- eviction at a 20% budget. The slots hold tokens 0 .. T-1 with the scores accumulated
  // by the steps above (as after a scored prefill).
  const int64_t heavy = T / 10, recent = T / 10, budget = heavy + recent;
  std::vector<int64_t> positions(B * H * C), state(B * 2);
  const std::vector<float> scores0 = scores;
  auto restore_prompt = [&] {
    std::memcpy(scores.data(), scores0.data(), scores.size() * sizeof(float));
    for (int64_t bh = 0; bh < B * H; ++bh)
      for (int64_t t = 0; t < T; ++t) positions[bh * C + t] = t;
    for (int64_t b = 0; b < B; ++b) state[b * 2] = T, state[b * 2 + 1] = T;
  };
  const effx::H2OStorage st{B, H, D, C, k.data(), v.data(), H * C * D, C * D, D,
                            scores.data(), positions.data(), state.data()};
  auto evict = [&] { effx::cpu::h2o_evict(st, effx::DType::Float32, heavy, recent, threads); };

  restore_prompt();
  evict();
  for (int64_t b = 0; b < B; ++b) {
    if (state[b * 2] != budget) fail("held %.0f after eviction, expected %.0f (row %lld of %lld)", double(state[b * 2]), double(budget), (long long)b, (long long)B);
    for (int64_t h = 0; h < H; ++h) {
      const int64_t bh = b * H + h;
      std::vector<char> kept(T, 0);
      for (int64_t i = 0; i < budget; ++i) {
        const int64_t p = positions[bh * C + i];
        if (p < 0 || p >= T || kept[p]) {
          fail("slot %.0f holds a bad or repeated position %.0f (row %lld, kv-head %lld)", double(i), double(p), b, h);
          continue;
        }
        kept[p] = 1;
        if (scores[bh * C + i] != scores0[bh * C + p])
          fail("score %.8g moved without its token (%.8g) (row %lld, kv-head %lld)", scores[bh * C + i], scores0[bh * C + p], b, h);
        for (int64_t d : {int64_t{0}, D - 1}) {
          const size_t at = (size_t(bh) * C + i) * D + d, orig = (size_t(bh) * C + p) * D + d;
          if (k[at] != hval(kSeedK + orig) || v[at] != hval(kSeedV + orig))
            fail("K/V row of token %.0f not moved with it (slot %.0f) (row %lld, kv-head %lld)", double(p), double(i), b, h);
        }
      }
      // Recent tokens all kept; every kept older token outranks every evicted one.
      double min_kept = INFINITY, max_evicted = -INFINITY;
      for (int64_t p = 0; p < T; ++p) {
        if (p >= T - recent) {
          if (!kept[p]) fail("recent token %.0f evicted (of %.0f) (row %lld, kv-head %lld)", double(p), double(T), b, h);
          continue;
        }
        const double s = scores0[bh * C + p];
        if (kept[p]) min_kept = std::min(min_kept, s);
        else max_evicted = std::max(max_evicted, s);
      }
      if (max_evicted > min_kept)
        fail("evicted score %.8g above kept heavy hitter %.8g (row %lld, kv-head %lld)", max_evicted, min_kept, b, h);
    }
  }
  const double t_compress = effx_bench::median_seconds_after(restore_prompt, evict, 1, 5);

  // Steady decoding: each step appends one token (slot `budget`, position `seen`) and evicts one.
  int64_t seen = T;
  auto next_token = [&] {
    for (int64_t b = 0; b < B; ++b) state[b * 2] = budget + 1, state[b * 2 + 1] = seen + 1;
    for (int64_t bh = 0; bh < B * H; ++bh) {
      positions[bh * C + budget] = seen;
      scores[bh * C + budget] = float(GROUP) / budget;
    }
    ++seen;
  };
  const double t_step_evict = effx_bench::median_seconds_after(next_token, evict, 3, 15);
  for (int64_t bh = 0; bh < B * H; ++bh) {
    std::set<int64_t> held(positions.begin() + bh * C, positions.begin() + bh * C + budget);
    if (int64_t(held.size()) != budget || !held.count(seen - 1) || state[(bh / H) * 2] != budget)
      fail("after a decode-step eviction: %.0f distinct positions, newest kept %.0f (row %lld, kv-head %lld)",
           double(held.size()), double(held.count(seen - 1)), bh / H, bh % H);
  }

  // The H2O decode step at the budget: scored attention over `budget` cached tokens, then evict.
  std::vector<int64_t> lengths_budget(B, budget);
  effx::AttentionArgs ab = as;
  ab.lengths = lengths_budget.data();
  const double t_budget_attn = effx_bench::median_seconds([&] { effx::cpu::dense_attention(ab, kv, effx::DType::Float32, threads); });
  const double t_h2o_step = t_budget_attn + t_step_evict;
  std::printf("h2o_evict, budget 20%% (heavy %lld + recent %lld of %lld tokens):\n", (long long)heavy, (long long)recent,
              (long long)T);
  std::printf("  prompt compression %lld -> %lld tokens: %10.3f ms\n", (long long)T, (long long)budget, t_compress * 1e3);
  std::printf("  per decode step (evict 1 per row, kv-head): %10.3f ms (%.1f%% of the scored attention at the budget)\n",
              t_step_evict * 1e3, 100 * t_step_evict / t_budget_attn);
  std::printf("  H2O decode step at the budget (scored attention %.3f ms + evict): %.3f ms, %.2fx faster than the "
              "full-cache scored step\n", t_budget_attn * 1e3, t_h2o_step * 1e3, t_score / t_h2o_step);
}

}  // namespace

int main(int argc, char** argv) {
  const auto [quick, threads] = effx_bench::parse_options(argc, argv);
  const double roof = effx_bench::host_copy_gbps();
  std::printf("host copy roof: %.1f GB/s, threads: %d\n", roof, threads);
  run_shape(2, 4096, threads, roof);
  if (!quick) run_shape(8, 8192, threads, roof);
  if (failures) {
    std::printf("FAILED: %d checks\n", failures);
    return 1;
  }
  std::printf("checks passed: scores sum to group_size * q_len, fp64 reference, eviction keeps recent + heavy\n");
  return 0;
}
