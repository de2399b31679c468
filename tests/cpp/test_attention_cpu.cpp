// effx C++ test: the CPU attention engine over a dense cache (include/effx/attention.h),
// torch-free, against a double-precision softmax: cached blocks read in place and staged
// blocks, decode rows and many-row units (block GEMM), a causal chunk and a token tree, sliding
// windows (narrower than the step, inside the cache, wider than everything), head dims that
// are not a multiple of the vector width, every storage dtype. Under AddressSanitizer (CI) it also bounds every scratch index.
#include <cmath>
#include <cstdio>
#include <random>
#include <utility>
#include <vector>

#include "check.h"
#include "effx/attention.h"

namespace {

constexpr int64_t B = 2, H = 2, HQ = 8, C = 320;

template <typename T>
void run(effx::DType dtype, int64_t D, int64_t n_cached, int64_t q_len, bool tree, int64_t window, double tol) {
  std::mt19937 rng(static_cast<unsigned>(D * 131 + q_len));
  std::normal_distribution<float> dist;
  auto fill = [&](std::vector<T>& v, std::vector<double>& ref) {
    for (size_t i = 0; i < v.size(); ++i) {
      v[i] = effx::from_float<T>(dist(rng));
      ref[i] = effx::to_float(v[i]);  // the reference sees the stored values
    }
  };
  std::vector<T> k(B * H * C * D), v(k.size()), q(B * HQ * q_len * D), kn(B * H * q_len * D), vn(kn.size());
  std::vector<double> kr(k.size()), vr(v.size()), qr(q.size()), knr(kn.size()), vnr(vn.size());
  fill(k, kr);
  fill(v, vr);
  fill(q, qr);
  fill(kn, knr);
  fill(vn, vnr);
  std::vector<int64_t> lengths = {n_cached, n_cached - 37}, parents(q_len);
  for (int64_t i = 0; i < q_len; ++i) parents[i] = i == 0 ? -1 : static_cast<int64_t>(rng() % i);
  std::vector<T> out(B * HQ * q_len * D);
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));

  effx::AttentionArgs a{};
  a.batch = B;
  a.q_heads = HQ;
  a.kv_heads = H;
  a.q_len = q_len;
  a.head_dim = D;
  a.q = {q.data(), HQ * q_len * D, q_len * D, D};
  a.k_new = {kn.data(), H * q_len * D, q_len * D, D};
  a.v_new = {vn.data(), H * q_len * D, q_len * D, D};
  a.out = out.data();
  a.lengths = lengths.data();
  a.lengths_stride = 1;
  a.parents = tree ? parents.data() : nullptr;
  a.causal = true;
  a.sm_scale = static_cast<float>(scale);
  a.max_cached = C;
  a.window = window;
  const effx::DenseKV kv{k.data(), v.data(), H * C * D, C * D, D};
  effx::cpu::dense_attention(a, kv, dtype, 2);

  double err = 0, norm = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = lengths[b];
    for (int64_t hq = 0; hq < HQ; ++hq) {
      const int64_t h = hq / (HQ / H);
      for (int64_t i = 0; i < q_len; ++i) {
        std::vector<double> s(n + q_len, -INFINITY);
        double mx = -INFINITY;
        for (int64_t t = 0; t < n + q_len; ++t) {
          bool visible = t < n || (!tree && t - n <= i);
          if (tree && t >= n) {
            for (int64_t j = i; j >= 0; j = parents[j]) visible = visible || j == t - n;
          }
          if (window > 0 && t <= n + i - window) visible = false;  // key position t, query n + i
          if (!visible) continue;
          double dot = 0;
          for (int64_t d = 0; d < D; ++d) {
            const double kk = t < n ? kr[((b * H + h) * C + t) * D + d] : knr[((b * H + h) * q_len + t - n) * D + d];
            dot += qr[((b * HQ + hq) * q_len + i) * D + d] * kk;
          }
          s[t] = dot * scale;
          mx = std::max(mx, s[t]);
        }
        double sum = 0;
        for (auto& x : s) sum += (x = std::exp(x - mx));
        for (int64_t d = 0; d < D; ++d) {
          double o = 0;
          for (int64_t t = 0; t < n + q_len; ++t) {
            o += s[t] / sum * (t < n ? vr[((b * H + h) * C + t) * D + d] : vnr[((b * H + h) * q_len + t - n) * D + d]);
          }
          const double diff = effx::to_float(out[((b * HQ + hq) * q_len + i) * D + d]) - o;
          err += diff * diff;
          norm += o * o;
        }
      }
    }
  }
  const double rel = std::sqrt(err / norm);
  EFFX_EXPECT(rel < tol, "%s D=%lld cached=%lld q_len=%lld tree=%d window=%lld: relative error %g",
              effx::dtype_name(dtype), (long long)D, (long long)n_cached, (long long)q_len, tree ? 1 : 0,
              (long long)window, rel);
}

}  // namespace

int main() {
  for (int64_t D : {64, 40, 128}) {
    for (int64_t q_len : {1, 3, 40}) {  // decode rows, a short chunk, a many-row unit (GEMM)
      // (tree, window): causal, a tree, then windows narrower than the step, inside the cache
      // (the first cached block skipped) and wider than everything.
      for (auto [tree, window] : {std::pair<bool, int64_t>{false, 0}, {true, 0}, {false, 7}, {false, 100}, {false, 300}}) {
        run<float>(effx::DType::Float32, D, 150, q_len, tree, window, 1e-5);
        run<effx::BFloat16>(effx::DType::BFloat16, D, 150, q_len, tree, window, 1e-2);
        run<effx::Half>(effx::DType::Float16, D, 150, q_len, tree, window, 1e-2);
      }
    }
  }
  std::printf("attention_cpu: ok\n");
  return 0;
}
