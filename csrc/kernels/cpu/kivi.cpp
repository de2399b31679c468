// effx family: KIVI 2/4-bit KV cache, CPU kernels: attention over quantized + residual +
// new tokens, and the append that applies the residual rule (layout in include/effx/kivi.h).
#include "effx/kivi.h"

#include <algorithm>
#include <array>
#include <vector>

#include "attention_engine.h"
#include "quant_span.h"

namespace effx {
namespace cpu {
namespace {

struct KiviDims {
  int64_t H, D, C, R, G, k_words, k_groups, v_words, v_groups;
  explicit KiviDims(const KiviStorage& s)
      : H(s.heads), D(s.head_dim), C(s.capacity), R(s.residual), G(s.group_size),
        k_words(s.capacity * s.bits / 32), k_groups(s.capacity / s.group_size),
        v_words(s.head_dim * s.bits / 32), v_groups(s.head_dim / s.group_size) {}
};

// Cached tokens of a KIVI layer, dequantized block by block. Blocks start at multiples of G,
// and the quantized key prefix is a multiple of R (so of G): a block's key groups are whole.
template <typename T, int BITS>
struct KiviCached {
  using Storage = T;
  const KiviStorage& s;
  KiviDims k;

  int64_t block() const { return k.G * std::max<int64_t>(1, 64 / k.G); }

  // Row (b, h)'s storage of keys (codes [D][k_words], scale and zero [D][k_groups], residual
  // [D][R]) or of values (codes [C][v_words], scale and zero [C][v_groups], residual [R][D]).
  struct Part {
    const int32_t* codes;
    const T* scale;
    const T* zero;
    const T* res;
  };
  Part keys_of(int64_t b, int64_t h) const {
    const int64_t bh = b * k.H + h;
    return {s.k_codes + bh * k.D * k.k_words, static_cast<const T*>(s.k_scale) + bh * k.D * k.k_groups,
            static_cast<const T*>(s.k_zero) + bh * k.D * k.k_groups, static_cast<const T*>(s.k_res) + bh * k.D * k.R};
  }
  Part values_of(int64_t b, int64_t h) const {
    const int64_t bh = b * k.H + h;
    return {s.v_codes + bh * k.C * k.v_words, static_cast<const T*>(s.v_scale) + bh * k.C * k.v_groups,
            static_cast<const T*>(s.v_zero) + bh * k.C * k.v_groups, static_cast<const T*>(s.v_res) + bh * k.R * k.D};
  }

  void keys_t(int64_t b, int64_t h, int64_t t0, int64_t t1, float* kt, int64_t ld) const {
    const int64_t quantized = s.state[b * 3 + 1];
    const auto [codes, scale, zero, res] = keys_of(b, h);
    int64_t t = t0;
    for (; t < std::min(t1, quantized); t += k.G) {
      for (int64_t d = 0; d < k.D; ++d) {
        dequantize_span<T, float, BITS>(codes + d * k.k_words + t * BITS / 32, k.G, k.G,
                                        scale + d * k.k_groups + t / k.G,
                                        zero + d * k.k_groups + t / k.G, kt + d * ld + (t - t0));
      }
    }
    for (; t < t1; ++t) {
      for (int64_t d = 0; d < k.D; ++d) kt[d * ld + (t - t0)] = to_float(res[d * k.R + t % k.R]);
    }
  }

  void values(int64_t b, int64_t h, int64_t t0, int64_t t1, float* v) const {
    const int64_t quantized = s.state[b * 3 + 2];
    const auto [codes, scale, zero, res] = values_of(b, h);
    for (int64_t t = t0; t < t1; ++t) {
      float* vt = v + (t - t0) * k.D;
      if (t < quantized) {
        dequantize_span<T, float, BITS>(codes + t * k.v_words, k.D, k.G, scale + t * k.v_groups,
                                        zero + t * k.v_groups, vt);
      } else {
        const T* r = res + (t % k.R) * k.D;
        for (int64_t d = 0; d < k.D; ++d) vt[d] = to_float(r[d]);
      }
    }
  }

  // The decode path computes on the codes (SPECS.md section 2): for keys
  // q.k_t = sum_d (q_d s_dg) c_dt + sum_d q_d m_dg, so each group's scale folds into the query
  // and its minimum into one bias per row; for values p_t v_td = (p_t s_tg) c_td + p_t m_tg,
  // so the scale folds into the probability and the minima gather into one bias per row and
  // channel group. With groups a whole number of vectors, the scales and minima of a key group
  // (over channels) or of a block's value groups (over tokens) are gathered once into vectors,
  // every row's coefficients and bias come from vector products with them, and Ops::fold keeps
  // up to kFoldRows rows' sums in registers while it unpacks the codes; otherwise a group,
  // token or residual run is unpacked to floats and added row by row.
  struct Scratch {
    float* run;    // an unpacked run of codes or residual entries
    float* bias;   // [rows][v_groups]
    float* coef;   // [rows][depth] of one fold
    float* scale;  // keys: [block groups][D]; values: [v_groups][block tokens]
    float* zero;   // the same for the minima
  };
  int64_t run_floats() const { return std::max({k.G, k.D, block()}); }
  int64_t gathered_floats() const { return std::max(k.D * block() / k.G, k.v_groups * block()); }
  int64_t fold_scratch(int64_t rows) const {
    return run_floats() + rows * (k.v_groups + std::max(k.D, block())) + 2 * gathered_floats();
  }
  Scratch split(float* p, int64_t rows) const {
    Scratch w;
    w.run = p;
    w.bias = w.run + run_floats();
    w.coef = w.bias + rows * k.v_groups;
    w.scale = w.coef + rows * std::max(k.D, block());
    w.zero = w.scale + gathered_floats();
    return w;
  }

  // scale_t[(g - g0) * D + d] = scale[d][g] for the groups [g0, g0 + count) of a block: the
  // channel-major layout puts each channel on its own cache line, so every line is read once
  // for all the block's groups.
  template <typename Ops>
  [[gnu::always_inline]] inline void gather_key_groups(const T* scale, const T* zero, int64_t g0, int64_t count,
                                                       const Scratch& w) const {
    float* __restrict__ st = w.scale;
    float* __restrict__ zt = w.zero;
    const int64_t D = k.D, stride = k.k_groups;
    for (int64_t d = 0; d < D; ++d) {
      const T* sd = scale + d * stride + g0;
      const T* zd = zero + d * stride + g0;
      for (int64_t j = 0; j < count; ++j) {
        st[j * D + d] = Ops::widen_one(sd[j]);
        zt[j * D + d] = Ops::widen_one(zd[j]);
      }
    }
  }

  template <typename Ops>
  [[gnu::always_inline]] inline void fold_scores(int64_t b, int64_t h, int64_t t0, int64_t t1, const float* qs,
                                                 int64_t rows, float* sc, int64_t ld, float* scratch) const {
    const int64_t quantized = s.state[b * 3 + 1];
    const auto [codes, scale, zero, res] = keys_of(b, h);
    const Scratch w = split(scratch, rows);
    const bool blocked = k.G % Ops::lanes == 0;
    for (int64_t r = 0; r < rows; ++r) std::fill(sc + r * ld, sc + r * ld + (t1 - t0), 0.0f);
    const int64_t tq = std::min(t1, quantized), g0 = t0 / k.G;
    if (blocked) gather_key_groups<Ops>(scale, zero, g0, (tq - t0) / k.G, w);
    int64_t t = t0;
    for (; t < tq; t += k.G) {  // whole groups: t0, kq are multiples of G
      const int64_t g = t / k.G;
      if (blocked) {
        const float* sg = w.scale + (g - g0) * k.D;
        const float* mg = w.zero + (g - g0) * k.D;
        for (int64_t r0 = 0; r0 < rows; r0 += Ops::kFoldRows) {
          const int rb = static_cast<int>(std::min<int64_t>(Ops::kFoldRows, rows - r0));
          for (int r = 0; r < rb; ++r) {
            w.bias[r0 + r] = Ops::scale_and_dot(w.coef + r * k.D, qs + (r0 + r) * k.D, sg, mg, k.D);
          }
          Ops::template fold<BITS>(rb, codes + t * BITS / 32, k.k_words, k.D, w.coef, k.D, sc + r0 * ld + (t - t0),
                                   ld, k.G);
        }
      } else {
        std::fill(w.bias, w.bias + rows, 0.0f);
        for (int64_t d = 0; d < k.D; ++d) {
          Ops::template unpack<BITS>(codes + d * k.k_words + t * BITS / 32, k.G, w.run);
          const float sdg = to_float(scale[d * k.k_groups + g]), mdg = to_float(zero[d * k.k_groups + g]);
          for (int64_t r = 0; r < rows; ++r) {
            const float qd = qs[r * k.D + d];
            Ops::axpy(sc + r * ld + (t - t0), w.run, qd * sdg, k.G);
            w.bias[r] += qd * mdg;
          }
        }
      }
      for (int64_t r = 0; r < rows; ++r) Ops::add(sc + r * ld + (t - t0), w.bias[r], k.G);
    }
    // The key residual holds [kq, n) in columns t % R = t - kq: one contiguous run.
    const int64_t count = t1 - t;
    for (int64_t d = 0; count > 0 && d < k.D; ++d) {
      const T* run = res + d * k.R + t % k.R;
      for (int64_t j = 0; j < count; ++j) w.run[j] = to_float(run[j]);
      for (int64_t r = 0; r < rows; ++r) Ops::axpy(sc + r * ld + (t - t0), w.run, qs[r * k.D + d], count);
    }
  }

  template <typename Ops>
  [[gnu::always_inline]] inline void fold_values(int64_t b, int64_t h, int64_t t0, int64_t t1, const float* p,
                                                 int64_t ld, int64_t rows, float* acc, float* scratch) const {
    const int64_t quantized = s.state[b * 3 + 2];
    const auto [codes, scale, zero, res] = values_of(b, h);
    const Scratch w = split(scratch, rows);
    std::fill(w.bias, w.bias + rows * k.v_groups, 0.0f);
    const int64_t tq = std::min(t1, quantized), nt = tq - t0;
    if (k.G % Ops::lanes == 0) {
      for (int64_t t = 0; t < nt; ++t) {
        for (int64_t g = 0; g < k.v_groups; ++g) {
          w.scale[g * nt + t] = Ops::widen_one(scale[(t0 + t) * k.v_groups + g]);
          w.zero[g * nt + t] = Ops::widen_one(zero[(t0 + t) * k.v_groups + g]);
        }
      }
      for (int64_t g = 0; nt > 0 && g < k.v_groups; ++g) {
        for (int64_t r0 = 0; r0 < rows; r0 += Ops::kFoldRows) {
          const int rb = static_cast<int>(std::min<int64_t>(Ops::kFoldRows, rows - r0));
          for (int r = 0; r < rb; ++r) {
            w.bias[(r0 + r) * k.v_groups + g] =
                Ops::scale_and_dot(w.coef + r * nt, p + (r0 + r) * ld, w.scale + g * nt, w.zero + g * nt, nt);
          }
          Ops::template fold<BITS>(rb, codes + t0 * k.v_words + g * k.G * BITS / 32, k.v_words, nt, w.coef, nt,
                                   acc + r0 * k.D + g * k.G, k.D, k.G);
        }
      }
    } else {
      for (int64_t t = t0; t < tq; ++t) {
        Ops::template unpack<BITS>(codes + t * k.v_words, k.D, w.run);
        for (int64_t g = 0; g < k.v_groups; ++g) {
          const float sg = to_float(scale[t * k.v_groups + g]), mg = to_float(zero[t * k.v_groups + g]);
          for (int64_t r = 0; r < rows; ++r) {
            const float pt = p[r * ld + (t - t0)];
            Ops::axpy(acc + r * k.D + g * k.G, w.run + g * k.G, pt * sg, k.G);
            w.bias[r * k.v_groups + g] += pt * mg;
          }
        }
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t g = 0; g < k.v_groups; ++g) Ops::add(acc + r * k.D + g * k.G, w.bias[r * k.v_groups + g], k.G);
    }
    for (int64_t t = std::max(t0, tq); t < t1; ++t) {  // the value residual: token t in row t % R
      const T* row = res + (t % k.R) * k.D;
      for (int64_t d = 0; d < k.D; ++d) w.run[d] = to_float(row[d]);
      for (int64_t r = 0; r < rows; ++r) Ops::axpy(acc + r * k.D, w.run, p[r * ld + (t - t0)], k.D);
    }
  }
};

template <typename T, int BITS>
void append_typed(const KiviStorage& s, const Strided& k_new, const Strided& v_new,
                  int64_t new_len, const int64_t* new_lengths, int num_threads) {
  const KiviDims k(s);
  // Written after the parallel loop: the heads of a row read the old state until then.
  std::vector<std::array<int64_t, 3>> new_state(s.batch);
  const T* kn = static_cast<const T*>(k_new.data);
  const T* vn = static_cast<const T*>(v_new.data);
#pragma omp parallel num_threads(std::max(1, num_threads))
  {
    std::vector<float> values(std::max(k.R, k.D));
    std::vector<uint32_t> q(std::max(k.R, k.D) + 32);
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < s.batch * k.H; ++bh) {
      const int64_t b = bh / k.H, h = bh % k.H;
      const int64_t n = s.state[b * 3];
      int64_t kq = s.state[b * 3 + 1], vq = s.state[b * 3 + 2];
      const int64_t tn = new_lengths ? new_lengths[b] : new_len;
      T* k_res = static_cast<T*>(s.k_res) + bh * k.D * k.R;
      T* v_res = static_cast<T*>(s.v_res) + bh * k.R * k.D;
      int32_t* k_codes = s.k_codes + bh * k.D * k.k_words;
      T* k_scale = static_cast<T*>(s.k_scale) + bh * k.D * k.k_groups;
      T* k_zero = static_cast<T*>(s.k_zero) + bh * k.D * k.k_groups;
      int32_t* v_codes = s.v_codes + bh * k.C * k.v_words;
      T* v_scale = static_cast<T*>(s.v_scale) + bh * k.C * k.v_groups;
      T* v_zero = static_cast<T*>(s.v_zero) + bh * k.C * k.v_groups;
      for (int64_t i = 0; i < tn; ++i) {
        const int64_t t = n + i, slot = t % k.R;
        // R values held already: the oldest (in this token's slot) leaves the window now.
        if (t - vq == k.R) {
          quantize_span<T, BITS>(v_res + slot * k.D, k.D, k.G, v_codes + vq * k.v_words,
                                 v_scale + vq * k.v_groups, v_zero + vq * k.v_groups,
                                 values.data(), q.data());
          ++vq;
        }
        const T* kr = kn + b * k_new.sb + h * k_new.sh + i * k_new.st;
        const T* vr = vn + b * v_new.sb + h * v_new.sh + i * v_new.st;
        std::copy(vr, vr + k.D, v_res + slot * k.D);
        for (int64_t d = 0; d < k.D; ++d) k_res[d * k.R + slot] = kr[d];
        // A full block of R keys (kq is a multiple of R, so the block fills slots 0..R-1):
        // quantize it per channel, in groups of G tokens.
        if (t + 1 - kq == k.R) {
          for (int64_t d = 0; d < k.D; ++d) {
            quantize_span<T, BITS>(k_res + d * k.R, k.R, k.G,
                                   k_codes + d * k.k_words + kq * BITS / 32,
                                   k_scale + d * k.k_groups + kq / k.G,
                                   k_zero + d * k.k_groups + kq / k.G, values.data(), q.data());
          }
          kq += k.R;
        }
      }
      // Every head of a row follows the same rule; head 0 records the row's new state.
      if (h == 0) new_state[b] = {n + tn, kq, vq};
    }
  }
  for (int64_t b = 0; b < s.batch; ++b) {
    for (int j = 0; j < 3; ++j) s.state[b * 3 + j] = new_state[b][j];
  }
}

template <typename T>
void attention_bits(const AttentionArgs& a, const KiviStorage& s, int num_threads) {
  if (s.bits == 2) return run_attention_on_this_cpu(a, KiviCached<T, 2>{s, KiviDims(s)}, num_threads);
  return run_attention_on_this_cpu(a, KiviCached<T, 4>{s, KiviDims(s)}, num_threads);
}

template <typename T>
void append_bits(const KiviStorage& s, const Strided& k_new, const Strided& v_new,
                 int64_t new_len, const int64_t* new_lengths, int num_threads) {
  if (s.bits == 2) return append_typed<T, 2>(s, k_new, v_new, new_len, new_lengths, num_threads);
  return append_typed<T, 4>(s, k_new, v_new, new_len, new_lengths, num_threads);
}

}  // namespace

void kivi_attention(const AttentionArgs& a, const KiviStorage& s, DType dtype, int num_threads) {
  switch (dtype) {
    case DType::Float32: return attention_bits<float>(a, s, num_threads);
    case DType::Float16: return attention_bits<Half>(a, s, num_threads);
    case DType::BFloat16: return attention_bits<BFloat16>(a, s, num_threads);
    case DType::Float64: break;  // not a storage dtype of this family (the op layer rejects it)
  }
}

void kivi_append(const KiviStorage& s, DType dtype, const Strided& k_new, const Strided& v_new,
                 int64_t new_len, const int64_t* new_lengths, int num_threads) {
  switch (dtype) {
    case DType::Float32:
      return append_bits<float>(s, k_new, v_new, new_len, new_lengths, num_threads);
    case DType::Float16:
      return append_bits<Half>(s, k_new, v_new, new_len, new_lengths, num_threads);
    case DType::BFloat16:
      return append_bits<BFloat16>(s, k_new, v_new, new_len, new_lengths, num_threads);
    case DType::Float64: break;  // not a storage dtype of this family (the op layer rejects it)
  }
}

}  // namespace cpu
}  // namespace effx
