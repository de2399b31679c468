// effx family: tree speculative decoding, CPU kernels (semantics and layout in
// include/effx/spec.h). One batch row per OpenMP iteration; a row's walk is sequential by nature
// (each step depends on the previous acceptance) but touches only the nodes on its path.
#include "effx/spec.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace effx {
namespace cpu {
namespace {

// The largest tau with mass(p >= tau) >= top_p. Positive floats order like their bit patterns,
// so tau is found on the bits (no sort): one pass sums the mass per bucket of the top 11 bits
// and picks, from the top, the bucket where the mass reaches top_p; a bisection over the few
// values of that bucket then settles the low bits. Two passes over the row, not one per bit.
float top_p_threshold(const float* p, int64_t V, float pmax, float top_p, std::vector<float>& cand) {
  constexpr int kShift = 20;
  std::array<float, (1u << (31 - kShift))> bucket_mass{};
  for (int64_t i = 0; i < V; ++i) bucket_mass[float_bits(p[i]) >> kShift] += p[i];
  uint32_t b = float_bits(pmax) >> kShift;
  float above = 0.0f;  // mass of the buckets above b
  for (; b > 0 && above + bucket_mass[b] < top_p; --b) above += bucket_mass[b];
  cand.clear();
  for (int64_t i = 0; i < V; ++i) {
    if (float_bits(p[i]) >> kShift == b) cand.push_back(p[i]);
  }
  uint32_t lo = b << kShift, hi = std::min(float_bits(pmax), ((b + 1) << kShift) - 1);
  while (lo < hi) {
    const uint32_t mid = lo + (hi - lo + 1) / 2;
    const float tau = bits_float(mid);
    float mass = above;
    for (float x : cand) mass += x >= tau ? x : 0.0f;
    if (mass >= top_p) lo = mid; else hi = mid - 1;
  }
  return bits_float(lo);
}

template <typename T>
void probs_row(const T* x, int64_t V, float temperature, float top_p, float* p, std::vector<float>& scratch) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < V; ++i) mx = std::max(mx, to_float(x[i]));
  float sum = 0.0f;
  for (int64_t i = 0; i < V; ++i) {
    p[i] = std::exp((to_float(x[i]) - mx) / temperature);
    sum += p[i];
  }
  float pmax = 0.0f;
  for (int64_t i = 0; i < V; ++i) {
    p[i] /= sum;
    pmax = std::max(pmax, p[i]);
  }
  if (!(top_p < 1.0f)) return;
  const float tau = top_p_threshold(p, V, pmax, top_p, scratch);
  float kept = 0.0f;
  for (int64_t i = 0; i < V; ++i) kept += p[i] >= tau ? p[i] : 0.0f;
  for (int64_t i = 0; i < V; ++i) p[i] = p[i] >= tau ? p[i] / kept : 0.0f;
}

// Walks row b from the root: choose(r) is the token wanted at row r (0 = root, i + 1 = node i).
template <typename Choose>
void walk(const TreeArgs& t, int64_t b, Choose choose) {
  const int64_t N = t.nodes;
  const int64_t* tok = t.tokens + b * N;
  const int64_t* par = t.parents + b * t.parents_sb;
  int64_t* acc = t.accepted + b * N;
  int64_t cur = -1, count = 0, want = choose(0);
  for (;;) {
    int64_t next = -1;
    for (int64_t j = cur + 1; j < N && next < 0; ++j) {
      if (par[j] == cur && tok[j] >= 0 && tok[j] == want) next = j;
    }
    if (next < 0) break;
    acc[count++] = next;
    cur = next;
    want = choose(cur + 1);
  }
  std::fill(acc + count, acc + N, int64_t{-1});
  t.num_accepted[b] = count;
  t.bonus[b] = want;
}

template <typename T>
void greedy_typed(const TreeArgs& t, const T* logits, int num_threads) {
  const int64_t V = t.vocab, R = t.nodes + 1;
#pragma omp parallel for num_threads(std::max(1, num_threads)) schedule(dynamic, 1)
  for (int64_t b = 0; b < t.batch; ++b) {
    walk(t, b, [&](int64_t r) {
      const T* x = logits + (b * R + r) * V;
      int64_t best = 0;
      float best_v = to_float(x[0]);
      for (int64_t i = 1; i < V; ++i) {
        const float v = to_float(x[i]);
        if (v > best_v || (std::isnan(best_v) && !std::isnan(v))) best = i, best_v = v;
      }
      return best;
    });
  }
}

// Inverse CDF: the first token whose cumulative mass exceeds u * total; rounding that leaves
// no such token falls back to the last token with mass.
int64_t draw(const float* p, int64_t V, float u) {
  float total = 0.0f;
  for (int64_t i = 0; i < V; ++i) total += p[i];
  const float target = u * total;
  float c = 0.0f;
  int64_t last = 0;
  for (int64_t i = 0; i < V; ++i) {
    if (p[i] <= 0.0f) continue;
    c += p[i];
    last = i;
    if (c > target) return i;
  }
  return last;
}

}  // namespace

void sampling_probs(const void* logits, DType dtype, int64_t rows, int64_t vocab, float temperature,
                    float top_p, float* probs, int num_threads) {
#pragma omp parallel num_threads(std::max(1, num_threads))
  {
    std::vector<float> scratch;
#pragma omp for schedule(dynamic, 1)
    for (int64_t r = 0; r < rows; ++r) {
      float* p = probs + r * vocab;
      auto row = [&](const auto* x) { probs_row(x + r * vocab, vocab, temperature, top_p, p, scratch); };
      switch (dtype) {
        case DType::Float32: row(static_cast<const float*>(logits)); break;
        case DType::Float16: row(static_cast<const Half*>(logits)); break;
        case DType::BFloat16: row(static_cast<const BFloat16*>(logits)); break;
        case DType::Float64: break;  // not an activation dtype of this family (the op layer rejects it)
      }
    }
  }
}

void verify_greedy(const TreeArgs& t, const void* logits, DType dtype, int num_threads) {
  switch (dtype) {
    case DType::Float32: return greedy_typed(t, static_cast<const float*>(logits), num_threads);
    case DType::Float16: return greedy_typed(t, static_cast<const Half*>(logits), num_threads);
    case DType::BFloat16: return greedy_typed(t, static_cast<const BFloat16*>(logits), num_threads);
    case DType::Float64: break;  // not an activation dtype of this family (the op layer rejects it)
  }
}

void verify_match(const TreeArgs& t, const int64_t* target_tokens, int num_threads) {
  const int64_t R = t.nodes + 1;
#pragma omp parallel for num_threads(std::max(1, num_threads)) schedule(dynamic, 1)
  for (int64_t b = 0; b < t.batch; ++b) {
    walk(t, b, [&](int64_t r) { return target_tokens[b * R + r]; });
  }
}

void verify_sample(const TreeArgs& t, const float* target_probs, const float* draft_probs,
                   const float* uniforms, int num_threads) {
  const int64_t N = t.nodes, R = N + 1, V = t.vocab;
#pragma omp parallel num_threads(std::max(1, num_threads))
  {
    std::vector<float> p(V), q(V);
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < t.batch; ++b) {
      const int64_t* tok = t.tokens + b * N;
      const int64_t* par = t.parents + b * t.parents_sb;
      const float* u = uniforms + b * R;
      int64_t* acc = t.accepted + b * N;
      int64_t cur = -1, count = 0;
      for (;;) {
        const float* p0 = target_probs + (b * R + cur + 1) * V;
        std::copy(p0, p0 + V, p.begin());
        std::copy(draft_probs + (b * R + cur + 1) * V, draft_probs + (b * R + cur + 2) * V, q.begin());
        int64_t next = -1;
        for (int64_t j = cur + 1; j < N && next < 0; ++j) {
          if (par[j] != cur || tok[j] < 0 || tok[j] >= V) continue;
          const int64_t x = tok[j];
          if (u[j + 1] * q[x] < p[x]) {
            next = j;
            break;
          }
          float s = 0.0f;
          for (int64_t i = 0; i < V; ++i) s += std::max(p[i] - q[i], 0.0f);
          // p == q leaves no residual: the target's own distribution is still exact there.
          for (int64_t i = 0; i < V; ++i) p[i] = s > 0.0f ? std::max(p[i] - q[i], 0.0f) / s : p0[i];
          q[x] = 0.0f;
          float sq = 0.0f;
          for (int64_t i = 0; i < V; ++i) sq += q[i];
          if (sq > 0.0f) {
            for (int64_t i = 0; i < V; ++i) q[i] /= sq;
          }
        }
        if (next < 0) {
          t.bonus[b] = draw(p.data(), V, u[0]);
          break;
        }
        acc[count++] = next;
        cur = next;
      }
      std::fill(acc + count, acc + N, int64_t{-1});
      t.num_accepted[b] = count;
    }
  }
}

}  // namespace cpu
}  // namespace effx
