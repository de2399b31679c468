// effx C++ test: DejaVu sparse MLP CPU kernels (include/effx/sparse.h), torch-free. Checks the
// gathered up projection (every activation, gated, biases, rows_per_index 2) and the down
// projection against a double-precision loop over the selected rows, shared and per-row index
// sets, empty sets, bitwise equality of the down projection for 1, 2 and 3 threads, the bf16
// GEMM path of larger batches, and the index validation.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "check.h"
#include "effx/sparse.h"

using effx::Activation;
using effx::DType;

namespace {

double act_ref(Activation a, double v) {
  switch (a) {
    case Activation::None: return v;
    case Activation::Relu: return v > 0 ? v : 0;
    case Activation::Gelu: return 0.5 * v * (1 + std::erf(v / std::sqrt(2.0)));
    case Activation::GeluTanh:
      return 0.5 * v * (1 + std::tanh(std::sqrt(2 / M_PI) * (v + 0.044715 * v * v * v)));
    case Activation::Silu: return v / (1 + std::exp(-v));
  }
  return v;
}

struct Case {
  int64_t batch, d, n_units, k, R;
  bool per_row, gated, bias;
};

std::vector<int64_t> make_sets(const Case& c, std::mt19937& rng) {
  const int64_t sets = c.per_row ? c.batch : 1;
  std::vector<int64_t> idx;
  for (int64_t s = 0; s < sets; ++s) {
    std::vector<int64_t> all(c.n_units);
    for (int64_t i = 0; i < c.n_units; ++i) all[i] = i;
    std::shuffle(all.begin(), all.end(), rng);
    idx.insert(idx.end(), all.begin(), all.begin() + c.k);
  }
  return idx;
}

void test_case(const Case& c, Activation act, int threads) {
  std::mt19937 rng(static_cast<unsigned>(c.batch * 131 + c.d * 7 + c.k + static_cast<int>(act)));
  std::normal_distribution<float> dist;
  const int64_t n = c.n_units * c.R, K = c.k * c.R;
  const int64_t x_stride = c.d + 5;  // strided rows
  std::vector<float> x(c.batch * x_stride), w(n * c.d), wg(n * c.d), w2(n * c.d), bu(n), bg(n), b2(c.d);
  for (auto* v : {&x, &w, &wg, &w2, &bu, &bg, &b2}) {
    for (auto& e : *v) e = dist(rng) * 0.3f;
  }
  const auto idx = make_sets(c, rng);
  const int64_t idx_stride = c.per_row ? c.k : 0;
  std::vector<float> h(c.batch * K), y(c.batch * c.d);
  const effx::SparseUpShape up{c.batch, c.d, c.k, c.R, x_stride, c.d, idx_stride};
  effx::cpu::sparse_mlp_up(up, DType::Float32, act, x.data(), w.data(), c.gated ? wg.data() : nullptr,
                           c.bias ? bu.data() : nullptr, c.bias && c.gated ? bg.data() : nullptr,
                           idx.data(), h.data(), threads);
  const effx::SparseDownShape down{c.batch, c.d, c.k, c.R, K, c.d, idx_stride};
  effx::cpu::sparse_mlp_down(down, DType::Float32, h.data(), w2.data(), c.bias ? b2.data() : nullptr,
                             idx.data(), y.data(), threads);
  for (int64_t b = 0; b < c.batch; ++b) {
    const int64_t* ids = idx.data() + b * idx_stride;
    std::vector<double> yr(c.d);
    for (int64_t col = 0; col < c.d; ++col) yr[col] = c.bias ? b2[col] : 0.0;
    for (int64_t j = 0; j < K; ++j) {
      const int64_t row = ids[j / c.R] * c.R + j % c.R;
      double u = c.bias ? bu[row] : 0.0, g = c.bias && c.gated ? bg[row] : 0.0;
      for (int64_t col = 0; col < c.d; ++col) {
        u += static_cast<double>(x[b * x_stride + col]) * w[row * c.d + col];
        g += static_cast<double>(x[b * x_stride + col]) * wg[row * c.d + col];
      }
      const double want = c.gated ? act_ref(act, g) * u : act_ref(act, u);
      const double got = h[b * K + j];
      EFFX_EXPECT(std::fabs(got - want) <= 1e-4 * (1 + std::fabs(want)), "up b %lld j %lld: %g vs %g",
                  static_cast<long long>(b), static_cast<long long>(j), got, want);
      for (int64_t col = 0; col < c.d; ++col) yr[col] += got * w2[row * c.d + col];
    }
    for (int64_t col = 0; col < c.d; ++col) {
      EFFX_EXPECT(std::fabs(y[b * c.d + col] - yr[col]) <= 1e-4 * (1 + std::fabs(yr[col])),
                  "down b %lld col %lld: %g vs %g", static_cast<long long>(b),
                  static_cast<long long>(col), y[b * c.d + col], yr[col]);
    }
  }
}

// bf16 through both projections: from 16 rows with one index set these run as GEMMs on bf16
// pairs (AMX tiles or AVX512_BF16 where the CPU has them; the dot products otherwise), checked
// against double sums of the same bf16 values under each ISA cap, the down projection also
// bitwise across thread counts. Shapes: odd and even selections past one 256-row block, d past
// one column slice, rows_per_index 2, gated and not.
void test_bf16(const Case& c, Activation act) {
  using effx::BFloat16;
  std::mt19937 rng(static_cast<unsigned>(c.batch * 17 + c.d + c.k));
  std::normal_distribution<float> dist;
  const int64_t n = c.n_units * c.R, K = c.k * c.R, x_stride = c.d + 6;
  auto draw = [&](int64_t size, float scale) {
    std::vector<BFloat16> v(size);
    for (auto& e : v) e = effx::from_float<BFloat16>(dist(rng) * scale);
    return v;
  };
  const auto x = draw(c.batch * x_stride, 1.0f), w = draw(n * c.d, 0.1f), wg = draw(n * c.d, 0.1f),
             w2 = draw(n * c.d, 0.1f), bu = draw(n, 0.3f), bg = draw(n, 0.3f), b2 = draw(c.d, 0.3f);
  const auto idx = make_sets(c, rng);
  auto f = [](BFloat16 v) { return static_cast<double>(effx::to_float(v)); };
  for (const char* isa : {"amx", "avx512bf16", "avx512"}) {
    setenv("EFFX_CPU_ISA", isa, 1);
    std::vector<BFloat16> h(c.batch * K), y(c.batch * c.d);
    const effx::SparseUpShape up{c.batch, c.d, c.k, c.R, x_stride, c.d, 0};
    effx::cpu::sparse_mlp_up(up, DType::BFloat16, act, x.data(), w.data(), c.gated ? wg.data() : nullptr,
                             c.bias ? bu.data() : nullptr, c.bias && c.gated ? bg.data() : nullptr, idx.data(),
                             h.data(), 2);
    const effx::SparseDownShape down{c.batch, c.d, c.k, c.R, K, c.d, 0};
    effx::cpu::sparse_mlp_down(down, DType::BFloat16, h.data(), w2.data(), c.bias ? b2.data() : nullptr, idx.data(),
                               y.data(), 2);
    for (int64_t b = 0; b < c.batch; ++b) {
      std::vector<double> yr(c.d);
      for (int64_t col = 0; col < c.d; ++col) yr[col] = c.bias ? f(b2[col]) : 0.0;
      for (int64_t j = 0; j < K; ++j) {
        const int64_t row = idx[j / c.R] * c.R + j % c.R;
        double u = c.bias ? f(bu[row]) : 0.0, g = c.bias && c.gated ? f(bg[row]) : 0.0;
        for (int64_t col = 0; col < c.d; ++col) {
          u += f(x[b * x_stride + col]) * f(w[row * c.d + col]);
          g += f(x[b * x_stride + col]) * f(wg[row * c.d + col]);
        }
        const double want = c.gated ? act_ref(act, g) * u : act_ref(act, u);
        const double got = f(h[b * K + j]);
        EFFX_EXPECT(std::fabs(got - want) <= 8e-3 * (1 + std::fabs(want)), "%s bf16 up b %lld j %lld: %g vs %g", isa,
                    static_cast<long long>(b), static_cast<long long>(j), got, want);
        for (int64_t col = 0; col < c.d; ++col) yr[col] += got * f(w2[row * c.d + col]);
      }
      for (int64_t col = 0; col < c.d; ++col) {
        EFFX_EXPECT(std::fabs(f(y[b * c.d + col]) - yr[col]) <= 8e-3 * (1 + std::fabs(yr[col])),
                    "%s bf16 down b %lld col %lld: %g vs %g", isa, static_cast<long long>(b),
                    static_cast<long long>(col), f(y[b * c.d + col]), yr[col]);
      }
    }
    for (int threads : {1, 3}) {
      std::vector<BFloat16> y2(c.batch * c.d);
      effx::cpu::sparse_mlp_down(down, DType::BFloat16, h.data(), w2.data(), c.bias ? b2.data() : nullptr, idx.data(),
                                 y2.data(), threads);
      for (int64_t i = 0; i < c.batch * c.d; ++i) {
        EFFX_EXPECT(y2[i].bits == y[i].bits, "%s bf16 down, %d threads: element %lld differs", isa, threads,
                    static_cast<long long>(i));
      }
    }
  }
  unsetenv("EFFX_CPU_ISA");
}

void test_down_bitwise_across_threads() {
  std::mt19937 rng(5);
  std::normal_distribution<float> dist;
  const int64_t batch = 3, d = 1000, n = 700, k = 500;
  std::vector<effx::BFloat16> h(batch * k), w(n * d), b(d);
  for (auto* v : {&h, &w, &b}) {
    for (auto& e : *v) e = effx::from_float<effx::BFloat16>(dist(rng));
  }
  const Case c{batch, d, n, k, 1, false, false, true};
  const auto idx = make_sets(c, rng);
  const effx::SparseDownShape s{batch, d, k, 1, k, d, 0};
  std::vector<effx::BFloat16> ref(batch * d);
  effx::cpu::sparse_mlp_down(s, DType::BFloat16, h.data(), w.data(), b.data(), idx.data(), ref.data(), 1);
  for (int threads : {2, 3, 1}) {
    std::vector<effx::BFloat16> y(batch * d);
    effx::cpu::sparse_mlp_down(s, DType::BFloat16, h.data(), w.data(), b.data(), idx.data(), y.data(), threads);
    for (int64_t i = 0; i < batch * d; ++i) {
      EFFX_EXPECT(y[i].bits == ref[i].bits, "threads %d element %lld differs", threads, static_cast<long long>(i));
    }
  }
}

void test_empty_set_gives_bias() {
  const int64_t batch = 2, d = 9;
  std::vector<float> h(1), w(4 * d, 1.0f), b(d), y(batch * d, -1.0f);
  for (int64_t i = 0; i < d; ++i) b[i] = static_cast<float>(i);
  const effx::SparseDownShape s{batch, d, 0, 1, 0, d, 0};
  effx::cpu::sparse_mlp_down(s, DType::Float32, h.data(), w.data(), b.data(), nullptr, y.data(), 2);
  for (int64_t i = 0; i < batch * d; ++i) EFFX_EXPECT(y[i] == b[i % d], "element %lld", static_cast<long long>(i));
}

void test_index_checks() {
  const std::vector<int64_t> ok{3, 0, 9, 4}, range{3, 10, 1, 2}, dup{1, 2, 3, 4, 5, 7, 5, 6};
  EFFX_EXPECT(effx::cpu::check_indices(ok.data(), 1, 4, 0, 10).problem == effx::IndexProblem::None, "valid");
  const auto r = effx::cpu::check_indices(range.data(), 1, 4, 4, 10);
  EFFX_EXPECT(r.problem == effx::IndexProblem::OutOfRange && r.position == 1 && r.value == 10, "range");
  // two sets of 4: the second repeats 5 (a value the first set also holds, which is fine)
  const auto q = effx::cpu::check_indices(dup.data(), 2, 4, 4, 10);
  EFFX_EXPECT(q.problem == effx::IndexProblem::Duplicate && q.set == 1 && q.position == 2 && q.value == 5,
              "duplicate set %lld position %lld", static_cast<long long>(q.set), static_cast<long long>(q.position));
}

}  // namespace

int main() {
  test_index_checks();
  test_empty_set_gives_bias();
  test_down_bitwise_across_threads();
  for (Activation act : {Activation::None, Activation::Relu, Activation::Gelu, Activation::GeluTanh,
                         Activation::Silu}) {
    test_case({3, 37, 20, 7, 1, false, false, true}, act, 1);
    test_case({5, 130, 33, 33, 1, true, true, true}, act, 2);
  }
  test_case({4, 64, 12, 5, 2, false, false, false}, Activation::None, 2);  // attention-head blocks
  test_case({6, 300, 64, 40, 3, true, true, false}, Activation::Silu, 3);
  test_case({9, 700, 120, 100, 1, false, true, true}, Activation::Silu, 2);  // threaded, batch tiles
  test_bf16({20, 300, 400, 301, 1, false, true, true}, Activation::Silu);
  test_bf16({37, 96, 200, 150, 2, false, false, false}, Activation::Gelu);
  test_bf16({16, 130, 70, 33, 1, false, false, true}, Activation::Relu);
  std::printf("sparse_cpu: ok\n");
  return 0;
}
