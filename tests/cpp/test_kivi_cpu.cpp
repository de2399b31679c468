// effx C++ test: KIVI cache CPU kernels (include/effx/kivi.h), torch-free. Appends a prefill
// and decode tokens, checks the residual rule's state after each step, and compares the
// fused attention with a double-precision softmax over the cache as dequantized by the
// quantization kernel of include/effx/quant.h.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "check.h"
#include "effx/kivi.h"
#include "effx/quant.h"

namespace {

// Built twice (tests/cpp/CMakeLists.txt): a block of the attention engine (64 tokens) spans
// groups of 16 and a whole residual; or, with EFFX_TEST_SMALL_HEAD, it is wider than the head
// (32) and the residual (128) is two blocks: the decode scratch must hold a block's run.
#ifdef EFFX_TEST_SMALL_HEAD
constexpr int64_t B = 2, H = 2, HQ = 8, D = 32, R = 128, G = 32, C = 512;
#else
constexpr int64_t B = 2, H = 2, HQ = 4, D = 64, R = 32, G = 16, C = 256;
#endif

struct Layer {
  int bits;
  std::vector<int32_t> k_codes, v_codes;
  std::vector<float> k_scale, k_zero, v_scale, v_zero, k_res, v_res;
  std::vector<int64_t> state;
  explicit Layer(int b)
      : bits(b), k_codes(B * H * D * C * b / 32), v_codes(B * H * C * D * b / 32), k_scale(B * H * D * C / G),
        k_zero(k_scale.size()), v_scale(B * H * C * D / G), v_zero(v_scale.size()), k_res(B * H * D * R),
        v_res(B * H * R * D), state(B * 3) {}
  effx::KiviStorage view() {
    return effx::KiviStorage{B, H, D, C, R, bits, static_cast<int>(G), k_codes.data(), k_scale.data(),
                             k_zero.data(), v_codes.data(), v_scale.data(), v_zero.data(), k_res.data(),
                             v_res.data(), state.data()};
  }
};

// Keys [H, n, D] and values of row b as the cache holds them, in double.
void materialize(Layer& L, int64_t b, std::vector<double>& keys, std::vector<double>& values) {
  const int64_t n = L.state[b * 3], kq = L.state[b * 3 + 1], vq = L.state[b * 3 + 2];
  keys.assign(H * n * D, 0.0);
  values.assign(H * n * D, 0.0);
  for (int64_t h = 0; h < H; ++h) {
    const int64_t bh = b * H + h;
    std::vector<float> kd(D * C), vd(C * D);
    effx::QuantShape ks{D, C, C, L.bits, static_cast<int>(G)};
    effx::cpu::dequantize(ks, L.k_codes.data() + bh * D * C * L.bits / 32, effx::DType::Float32,
                          L.k_scale.data() + bh * D * C / G, L.k_zero.data() + bh * D * C / G,
                          effx::DType::Float32, kd.data(), 1);
    effx::QuantShape vs{C, D, D, L.bits, static_cast<int>(G)};
    effx::cpu::dequantize(vs, L.v_codes.data() + bh * C * D * L.bits / 32, effx::DType::Float32,
                          L.v_scale.data() + bh * C * D / G, L.v_zero.data() + bh * C * D / G,
                          effx::DType::Float32, vd.data(), 1);
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t d = 0; d < D; ++d) {
        keys[(h * n + t) * D + d] = t < kq ? kd[d * C + t] : L.k_res[(bh * D + d) * R + t % R];
        values[(h * n + t) * D + d] = t < vq ? vd[t * D + d] : L.v_res[(bh * R + t % R) * D + d];
      }
    }
  }
}

void run(int bits) {
  std::mt19937 rng(bits);
  std::normal_distribution<float> dist;
  Layer L(bits);
  auto append = [&](int64_t tn) {
    std::vector<float> k(B * H * tn * D), v(k.size());
    for (auto& x : k) x = dist(rng);
    for (auto& x : v) x = dist(rng);
    const effx::Strided ks{k.data(), H * tn * D, tn * D, D}, vs{v.data(), H * tn * D, tn * D, D};
    effx::cpu::kivi_append(L.view(), effx::DType::Float32, ks, vs, tn, nullptr, 2);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t n = L.state[b * 3];
      EFFX_EXPECT(L.state[b * 3 + 1] == n - n % R, "keys quantized %lld at n %lld", (long long)L.state[b * 3 + 1],
                  (long long)n);
      EFFX_EXPECT(L.state[b * 3 + 2] == (n > R ? n - R : 0), "values quantized %lld at n %lld",
                  (long long)L.state[b * 3 + 2], (long long)n);
    }
  };
  append(77);
  for (int i = 0; i < 40; ++i) append(1);

  // One new token per row; the reference attends over the materialized cache plus it.
  std::vector<float> q(B * HQ * D), kn(B * H * D), vn(B * H * D), out(B * HQ * D), lse(B * HQ);
  for (auto& x : q) x = dist(rng);
  for (auto& x : kn) x = dist(rng);
  for (auto& x : vn) x = dist(rng);
  std::vector<int64_t> lengths(B);
  for (int64_t b = 0; b < B; ++b) lengths[b] = L.state[b * 3];
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
  a.lse = lse.data();
  a.lengths = L.state.data();
  a.lengths_stride = 3;
  a.causal = true;
  a.sm_scale = 0.125f;
  a.max_cached = C;
  effx::cpu::kivi_attention(a, L.view(), effx::DType::Float32, 2);

  double err = 0, norm = 0;
  for (int64_t b = 0; b < B; ++b) {
    std::vector<double> keys, values;
    materialize(L, b, keys, values);
    const int64_t n = L.state[b * 3];
    for (int64_t hq = 0; hq < HQ; ++hq) {
      const int64_t h = hq / (HQ / H);
      std::vector<double> s(n + 1);
      double mx = -1e300;
      for (int64_t t = 0; t <= n; ++t) {
        double dot = 0;
        for (int64_t d = 0; d < D; ++d) {
          const double k = t < n ? keys[(h * n + t) * D + d] : kn[(b * H + h) * D + d];
          dot += q[(b * HQ + hq) * D + d] * k;
        }
        s[t] = dot * 0.125;
        mx = std::max(mx, s[t]);
      }
      double sum = 0;
      for (auto& x : s) sum += (x = std::exp(x - mx));
      EFFX_EXPECT(std::fabs(lse[b * HQ + hq] - (mx + std::log(sum))) < 1e-4, "lse");
      for (int64_t d = 0; d < D; ++d) {
        double o = 0;
        for (int64_t t = 0; t <= n; ++t) o += s[t] / sum * (t < n ? values[(h * n + t) * D + d] : vn[(b * H + h) * D + d]);
        const double diff = out[(b * HQ + hq) * D + d] - o;
        err += diff * diff;
        norm += o * o;
      }
    }
  }
  EFFX_EXPECT(std::sqrt(err / norm) < 1e-5, "bits %d: relative error %g", bits, std::sqrt(err / norm));
}

}  // namespace

int main() {
  run(2);
  run(4);
  std::printf("kivi_cpu: ok\n");
  return 0;
}
