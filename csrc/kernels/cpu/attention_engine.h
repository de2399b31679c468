// effx: the CPU engine behind every fused cache attention (include/effx/attention.h). A cache
// policy supplies its cached tokens block by block as fp32 (keys transposed [D][block],
// values [block][D]); the engine appends the step's new tokens, masks, and runs one online
// softmax (running max and sum, rescaled per block) so no [queries, tokens] matrix is ever
// materialized. Work unit: (batch row, kv-head, chunk of query tokens), so the query heads of
// one GQA group share every loaded block. With H2O scoring, a unit takes all query tokens of
// its (row, kv-head) and keeps each block's exponentials with the running max they used, so
// the final probabilities come from one rescale at the end instead of a second pass.
// Units with many query rows (prefill, token trees, wide GQA groups) run both products
// (scores = Q K^T, out += P V) through the register-tiled block GEMM of block_gemm.inc; a few
// rows (decode) use plain loops, where packing the block for the GEMM would cost more than it
// saves.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "block_gemm.h"
#include "effx/attention.h"

namespace effx {
namespace cpu {

// Query rows per unit from which the block GEMM pays for its packing.
constexpr int64_t kGemmRows = 16;

// Gemm: one of the isa_*::Kernels of block_gemm_variants.inc (chosen by the caller for the CPU).
// Cached: a policy with
//   int64_t block() const: tokens per block (the engine's blocks start at multiples of it);
//   void keys_t(b, h, t0, t1, float* kt, int64_t ld) const: kt[d * ld + t - t0] for cached t;
//   void values(b, h, t0, t1, float* v) const: v[(t - t0) * D + d].
template <typename Gemm, typename T, typename Cached>
void run_attention(const AttentionArgs& a, const Cached& cached, int num_threads) {
  using block_gemm::MatA;
  using block_gemm::MatB;
  using block_gemm::MatC;
  const int64_t D = a.head_dim;
  const int64_t group = a.q_heads / a.kv_heads;
  const bool scoring = a.scores != nullptr;
  // query tokens per unit (scoring sums over all of them, so one unit owns them all)
  const int64_t chunk = scoring ? std::max<int64_t>(1, a.q_len) : std::max<int64_t>(1, 64 / group);
  const int64_t chunks = (a.q_len + chunk - 1) / chunk;
  const int64_t units = a.batch * a.kv_heads * chunks;
  const int64_t BT = cached.block();
  const int64_t max_rows = group * chunk;
  const int64_t mask_words = (a.q_len + 63) / 64;
  const bool tree = a.parents != nullptr;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const T* q = static_cast<const T*>(a.q.data);
  const T* k_new = static_cast<const T*>(a.k_new.data);
  const T* v_new = static_cast<const T*>(a.v_new.data);
  T* out = static_cast<T*>(a.out);

#pragma omp parallel num_threads(std::max(1, num_threads))
  {
    std::vector<float> qs(max_rows * D), acc(max_rows * D), kt(D * BT), v(BT * D),
        s(max_rows * BT), m(max_rows), l(max_rows);
    std::vector<uint64_t> ancestors(tree ? chunk * mask_words : 0);
    std::vector<float> probs, block_max;  // scoring: [rows][tokens] and [rows][blocks]
    std::vector<float> alpha(max_rows);
    block_gemm::Workspace<float> ws;
#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < units; ++u) {
      const int64_t b = u / (a.kv_heads * chunks);
      const int64_t hk = (u / chunks) % a.kv_heads;
      const int64_t i0 = (u % chunks) * chunk;
      const int64_t n = a.lengths[b * a.lengths_stride];
      const int64_t tn = a.new_lengths ? std::min(a.new_lengths[b], a.q_len) : a.q_len;
      const int64_t i1 = std::min(i0 + chunk, std::max(i0, tn));  // valid queries [i0, i1)
      const int64_t rows = (i1 - i0) * group;  // row r: query i0 + r / group, head r % group

      for (int64_t r = 0; r < rows; ++r) {
        const int64_t hq = hk * group + r % group, i = i0 + r / group;
        const T* qr = q + b * a.q.sb + hq * a.q.sh + i * a.q.st;
        for (int64_t d = 0; d < D; ++d) qs[r * D + d] = to_float(qr[d]) * a.sm_scale;
        std::fill(acc.begin() + r * D, acc.begin() + (r + 1) * D, 0.0f);
        m[r] = kNegInf;
        l[r] = 0.0f;
      }
      if (tree) {
        const int64_t* par = a.parents + b * a.parents_sb;
        std::fill(ancestors.begin(), ancestors.end(), 0);
        for (int64_t i = i0; i < i1; ++i) {
          uint64_t* bits = ancestors.data() + (i - i0) * mask_words;
          // parents[j] < j is checked by the op; the step bound keeps a bad tree from hanging.
          for (int64_t j = i, steps = 0; j >= 0 && j < tn && steps <= i; j = par[j], ++steps) {
            bits[j / 64] |= uint64_t{1} << (j % 64);
          }
        }
      }
      // New tokens visible to the last valid query of the unit.
      const int64_t new_seen = (a.causal || tree) ? i1 : tn;
      const int64_t total = rows > 0 ? n + new_seen : 0;
      const int64_t blocks = (total + BT - 1) / BT;
      if (scoring) {
        probs.assign(rows * total, 0.0f);
        block_max.assign(rows * blocks, kNegInf);
      }

      for (int64_t t0 = 0; t0 < total; t0 += BT) {
        const int64_t t1 = std::min(t0 + BT, total), bt = t1 - t0;
        const int64_t c1 = std::min(t1, n);
        if (t0 < c1) {
          cached.keys_t(b, hk, t0, c1, kt.data(), BT);
          cached.values(b, hk, t0, c1, v.data());
        }
        for (int64_t t = std::max(t0, n); t < t1; ++t) {
          const T* kr = k_new + b * a.k_new.sb + hk * a.k_new.sh + (t - n) * a.k_new.st;
          const T* vr = v_new + b * a.v_new.sb + hk * a.v_new.sh + (t - n) * a.v_new.st;
          for (int64_t d = 0; d < D; ++d) {
            kt[d * BT + (t - t0)] = to_float(kr[d]);
            v[(t - t0) * D + d] = to_float(vr[d]);
          }
        }
        const bool gemm = rows >= kGemmRows;
        if (gemm) {
          Gemm::template run<float>(rows, bt, D, MatA<float>{qs.data(), D, 1}, MatB<float>{kt.data(), BT, 1},
                                    MatC<float>{s.data(), BT, 1}, false, ws);
        }
        for (int64_t r = 0; r < rows; ++r) {
          float* sr = s.data() + r * BT;
          if (!gemm) {
            std::fill(sr, sr + bt, 0.0f);
            for (int64_t d = 0; d < D; ++d) {
              const float qd = qs[r * D + d];
              const float* kd = kt.data() + d * BT;
              for (int64_t j = 0; j < bt; ++j) sr[j] += qd * kd[j];
            }
          }
          const int64_t i = i0 + r / group;
          for (int64_t t = std::max(t0, n); t < t1; ++t) {
            const int64_t j = t - n;
            const bool visible =
                tree ? (ancestors[(i - i0) * mask_words + j / 64] >> (j % 64)) & 1u
                     : (!a.causal || j <= i);
            if (!visible) sr[t - t0] = kNegInf;
          }
          float mx = m[r];
          for (int64_t j = 0; j < bt; ++j) mx = std::max(mx, sr[j]);
          if (mx == kNegInf) {  // nothing visible in this block yet: it adds nothing
            std::fill(sr, sr + bt, 0.0f);
            alpha[r] = 1.0f;
            continue;
          }
          alpha[r] = std::exp(m[r] - mx);
          float sum = 0.0f;
          for (int64_t j = 0; j < bt; ++j) {
            sr[j] = std::exp(sr[j] - mx);
            sum += sr[j];
          }
          l[r] = l[r] * alpha[r] + sum;
          m[r] = mx;
          if (scoring) {
            std::copy(sr, sr + bt, probs.begin() + r * total + t0);
            block_max[r * blocks + t0 / BT] = mx;
          }
        }
        for (int64_t r = 0; r < rows; ++r) {
          float* ar = acc.data() + r * D;
          for (int64_t d = 0; d < D; ++d) ar[d] *= alpha[r];
          if (gemm) continue;
          const float* sr = s.data() + r * BT;
          for (int64_t j = 0; j < bt; ++j) {
            const float p = sr[j];
            const float* vj = v.data() + j * D;
            for (int64_t d = 0; d < D; ++d) ar[d] += p * vj[d];
          }
        }
        if (gemm) {
          Gemm::template run<float>(rows, D, bt, MatA<float>{s.data(), BT, 1}, MatB<float>{v.data(), D, 1},
                                    MatC<float>{acc.data(), D, 1}, true, ws);
        }
      }

      if (scoring && rows > 0) {
        // p = exp(s - m_block) * exp(m_block - m_final) / l, summed over the unit's rows.
        std::vector<float> factor(rows * blocks);
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t k = 0; k < blocks; ++k) {
            const float mb = block_max[r * blocks + k];
            factor[r * blocks + k] = mb == kNegInf ? 0.0f : std::exp(mb - m[r]) / l[r];
          }
        }
        float* sc = a.scores + b * a.scores_sb + hk * a.scores_sh;
        for (int64_t t = 0; t < total; ++t) {
          float col = 0.0f;
          for (int64_t r = 0; r < rows; ++r) col += probs[r * total + t] * factor[r * blocks + t / BT];
          sc[t] = t < n ? sc[t] + col : col;
        }
        // New tokens no valid query saw (padding) start at zero.
        for (int64_t t = total; t < n + tn; ++t) sc[t] = 0.0f;
      }

      for (int64_t i = i0; i < std::min(i0 + chunk, a.q_len); ++i) {
        for (int64_t h = 0; h < group; ++h) {
          const int64_t hq = hk * group + h;
          T* o = out + ((b * a.q_heads + hq) * a.q_len + i) * D;
          const bool valid = i < i1;
          const int64_t r = (i - i0) * group + h;
          const float inv = valid && l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
          for (int64_t d = 0; d < D; ++d) o[d] = from_float<T>(valid ? acc[r * D + d] * inv : 0.0f);
          if (a.lse) {
            a.lse[(b * a.q_heads + hq) * a.q_len + i] = valid ? m[r] + std::log(l[r]) : kNegInf;
          }
        }
      }
    }
  }
}

// run_attention with the block GEMM compiled for the widest instruction set of this CPU.
// Cached names its storage type T as Cached::Storage.
namespace {

#include "block_gemm_variants.inc"

template <typename Cached>
void run_attention_on_this_cpu(const AttentionArgs& a, const Cached& cached, int num_threads) {
  using T = typename Cached::Storage;
  switch (block_gemm::best_isa()) {
    case block_gemm::Isa::Avx512: return run_attention<isa_avx512::Kernels, T>(a, cached, num_threads);
    case block_gemm::Isa::Avx2: return run_attention<isa_avx2::Kernels, T>(a, cached, num_threads);
    case block_gemm::Isa::Baseline: return run_attention<isa_baseline::Kernels, T>(a, cached, num_threads);
  }
}

}  // namespace
}  // namespace cpu
}  // namespace effx
