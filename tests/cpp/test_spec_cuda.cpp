// effx C++ test: the CUDA tree-verification kernels agree with the CPU ones on random trees
// over a batch (one tree per row, and one tree shared by the batch): greedy, target-sample
// matching, exact multi-draft sampling with the same uniforms, and the temperature / top-p
// probabilities (fp32 and bf16 logits, vocabularies that are no multiple of the block).
// Runs on a GPU, or on the SIMT emulator (test_spec_simt); exits 77 (ctest: skipped) when
// neither is there.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "check.h"
#include "cuda_buffers.h"
#include "effx/spec.h"
#include "effx/spec_cuda.h"

namespace {

struct Tree {
  int64_t B, N, V;
  std::vector<int64_t> tokens, parents;
  int64_t parents_sb;
};

// Children of a node carry distinct tokens, so at most one child matches a target token.
Tree random_tree(int64_t B, int64_t N, int64_t V, bool shared, std::mt19937& rng) {
  Tree t{B, N, V, std::vector<int64_t>(B * N), std::vector<int64_t>((shared ? 1 : B) * N), shared ? 0 : N};
  for (int64_t b = 0; b < (shared ? 1 : B); ++b) {
    for (int64_t i = 0; i < N; ++i) t.parents[b * N + i] = static_cast<int64_t>(rng() % (i + 1)) - 1;
  }
  for (int64_t b = 0; b < B; ++b) {
    const int64_t* par = t.parents.data() + b * t.parents_sb;
    for (int64_t i = 0; i < N; ++i) {
      int64_t tok;
      bool clash;
      do {
        tok = static_cast<int64_t>(rng() % V);
        clash = false;
        for (int64_t j = 0; j < i; ++j) clash = clash || (par[j] == par[i] && t.tokens[b * N + j] == tok);
      } while (clash);
      t.tokens[b * N + i] = tok;
    }
  }
  return t;
}

struct Out {
  std::vector<int64_t> accepted, num, bonus;
};

template <typename Run>
Out run_cpu(const Tree& t, Run run) {
  Out o{std::vector<int64_t>(t.B * t.N, 0), std::vector<int64_t>(t.B), std::vector<int64_t>(t.B)};
  run(effx::TreeArgs{t.B, t.N, t.V, t.tokens.data(), t.parents.data(), t.parents_sb, o.accepted.data(), o.num.data(),
                     o.bonus.data()});
  return o;
}

template <typename Run>
Out run_cuda(const Tree& t, Run run) {
  int64_t *tok = to_device(t.tokens), *par = to_device(t.parents);
  int64_t *acc = to_device(std::vector<int64_t>(t.B * t.N, 0)), *num = to_device(std::vector<int64_t>(t.B));
  int64_t* bonus = to_device(std::vector<int64_t>(t.B));
  CUDA_OK(run(effx::TreeArgs{t.B, t.N, t.V, tok, par, t.parents_sb, acc, num, bonus}));
  CUDA_OK(cudaDeviceSynchronize());
  Out o{to_host(acc, t.B * t.N), to_host(num, t.B), to_host(bonus, t.B)};
  for (int64_t* p : {tok, par, acc, num, bonus}) CUDA_OK(cudaFree(p));
  return o;
}

void expect_same(const Out& got, const Out& want, const Tree& t, const char* what) {
  for (int64_t b = 0; b < t.B; ++b) {
    EFFX_EXPECT(got.num[b] == want.num[b] && got.bonus[b] == want.bonus[b],
                "%s row %lld: %lld accepted, bonus %lld; the CPU %lld, %lld", what, (long long)b,
                (long long)got.num[b], (long long)got.bonus[b], (long long)want.num[b], (long long)want.bonus[b]);
    for (int64_t i = 0; i < want.num[b]; ++i) {
      EFFX_EXPECT(got.accepted[b * t.N + i] == want.accepted[b * t.N + i], "%s row %lld: accepted[%lld]", what,
                  (long long)b, (long long)i);
    }
  }
}

// Logits that make long accepted paths likely: each node's draft children get a boost.
std::vector<float> tree_logits(const Tree& t, std::mt19937& rng) {
  std::normal_distribution<float> dist;
  std::vector<float> logits(t.B * (t.N + 1) * t.V);
  for (auto& x : logits) x = dist(rng);
  for (int64_t b = 0; b < t.B; ++b) {
    for (int64_t i = 0; i < t.N; ++i) {
      const int64_t parent = t.parents[b * t.parents_sb + i];
      if (rng() % 3) logits[(b * (t.N + 1) + parent + 1) * t.V + t.tokens[b * t.N + i]] += 4.0f;
    }
  }
  return logits;
}

std::vector<float> softmax_rows(const std::vector<float>& logits, int64_t V, float temperature) {
  std::vector<float> p(logits.size());
  for (size_t r = 0; r < logits.size() / V; ++r) {
    double mx = -INFINITY, sum = 0;
    for (int64_t v = 0; v < V; ++v) mx = std::max(mx, static_cast<double>(logits[r * V + v]));
    for (int64_t v = 0; v < V; ++v) sum += std::exp((logits[r * V + v] - mx) / temperature);
    for (int64_t v = 0; v < V; ++v) p[r * V + v] = static_cast<float>(std::exp((logits[r * V + v] - mx) / temperature) / sum);
  }
  return p;
}

void compare(int64_t B, int64_t N, int64_t V, bool shared, unsigned seed) {
  std::mt19937 rng(seed);
  const Tree t = random_tree(B, N, V, shared, rng);
  const std::vector<float> logits = tree_logits(t, rng);
  float* dlogits = to_device(logits);

  expect_same(run_cuda(t, [&](const effx::TreeArgs& a) { return effx::cuda::verify_greedy(a, dlogits, effx::DType::Float32, nullptr); }),
              run_cpu(t, [&](const effx::TreeArgs& a) { effx::cpu::verify_greedy(a, logits.data(), effx::DType::Float32, 2); }),
              t, "greedy");

  std::vector<int64_t> samples(B * (N + 1));
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t r = 0; r <= N; ++r) {  // the argmax mostly, so paths are long
      const float* row = logits.data() + (b * (N + 1) + r) * V;
      samples[b * (N + 1) + r] = rng() % 4 ? std::max_element(row, row + V) - row : static_cast<int64_t>(rng() % V);
    }
  }
  int64_t* dsamples = to_device(samples);
  expect_same(run_cuda(t, [&](const effx::TreeArgs& a) { return effx::cuda::verify_match(a, dsamples, nullptr); }),
              run_cpu(t, [&](const effx::TreeArgs& a) { effx::cpu::verify_match(a, samples.data(), 2); }), t, "match");

  const std::vector<float> p = softmax_rows(logits, V, 1.0f);
  std::vector<float> draft_logits = logits;
  std::normal_distribution<float> noise;
  for (auto& x : draft_logits) x += noise(rng);
  const std::vector<float> q = softmax_rows(draft_logits, V, 1.0f);
  std::vector<float> u(B * (N + 1));
  std::uniform_real_distribution<float> uni(0.0f, 1.0f);
  for (auto& x : u) x = uni(rng);
  float *dp = to_device(p), *dq = to_device(q), *du = to_device(u);
  char* ws = nullptr;
  expect_same(run_cuda(t,
                       [&](const effx::TreeArgs& a) {
                         ws = to_device(std::vector<char>(effx::cuda::verify_sample_workspace_bytes(a)));
                         return effx::cuda::verify_sample(a, dp, dq, du, ws, nullptr);
                       }),
              run_cpu(t, [&](const effx::TreeArgs& a) { effx::cpu::verify_sample(a, p.data(), q.data(), u.data(), 2); }),
              t, "sample");

  // Sampling probabilities at two temperatures and nuclei, from fp32 and bf16 logits.
  const int64_t rows = B * (N + 1);
  for (const float temperature : {1.0f, 0.7f}) {
    for (const float top_p : {1.0f, 0.9f, 0.3f}) {
      std::vector<float> want(rows * V);
      effx::cpu::sampling_probs(logits.data(), effx::DType::Float32, rows, V, temperature, top_p, want.data(), 2);
      float* dout = to_device(std::vector<float>(rows * V));
      CUDA_OK(effx::cuda::sampling_probs(dlogits, effx::DType::Float32, rows, V, temperature, top_p, dout, nullptr));
      const auto got = to_host(dout, rows * V);
      // A token at the nucleus edge may fall on either side by rounding, which moves the row's
      // normalizer: compare the rows renormalized over the tokens both kept.
      for (int64_t r = 0; r < rows; ++r) {
        const float* g = got.data() + r * V;
        const float* w = want.data() + r * V;
        int64_t edge = 0;
        double gs = 0, ws_ = 0;
        for (int64_t v = 0; v < V; ++v) {
          edge += (g[v] == 0) != (w[v] == 0);
          if (g[v] != 0 && w[v] != 0) gs += g[v], ws_ += w[v];
        }
        EFFX_EXPECT(edge <= 1, "sampling_probs T=%g top_p=%g row %lld: %lld tokens in or out of the nucleus",
                    temperature, top_p, (long long)r, (long long)edge);
        for (int64_t v = 0; v < V; ++v) {
          if (g[v] == 0 || w[v] == 0) continue;
          EFFX_EXPECT(std::abs(g[v] / gs - w[v] / ws_) <= 2e-5 + 2e-4 * w[v] / ws_, "sampling_probs T=%g top_p=%g: [%lld, %lld] %g vs %g",
                      temperature, top_p, (long long)r, (long long)v, g[v], w[v]);
        }
      }
      CUDA_OK(cudaFree(dout));
    }
  }
  std::vector<effx::BFloat16> lbf(logits.size());
  std::vector<float> rounded(logits.size());
  for (size_t i = 0; i < logits.size(); ++i) rounded[i] = effx::to_float(lbf[i] = effx::from_float<effx::BFloat16>(logits[i]));
  std::vector<float> want(rows * V);
  effx::cpu::sampling_probs(lbf.data(), effx::DType::BFloat16, rows, V, 1.0f, 1.0f, want.data(), 2);
  effx::BFloat16* dlbf = to_device(lbf);
  float* dout = to_device(std::vector<float>(rows * V));
  CUDA_OK(effx::cuda::sampling_probs(dlbf, effx::DType::BFloat16, rows, V, 1.0f, 1.0f, dout, nullptr));
  const auto got = to_host(dout, rows * V);
  for (int64_t i = 0; i < rows * V; ++i) {
    EFFX_EXPECT(std::abs(got[i] - want[i]) <= 2e-5f + 2e-4f * want[i], "sampling_probs bf16: [%lld]", (long long)i);
  }
  for (void* ptr : {(void*)dlogits, (void*)dsamples, (void*)dp, (void*)dq, (void*)du, (void*)ws, (void*)dlbf, (void*)dout}) {
    CUDA_OK(cudaFree(ptr));
  }
}

}  // namespace

int main() {
  require_device("spec_cuda");
  compare(3, 12, 50, false, 1);
  compare(2, 40, 301, true, 2);
  compare(1, 1, 7, false, 3);
  compare(4, 48, 500, false, 4);
  std::printf("spec_cuda: ok\n");
  return 0;
}
