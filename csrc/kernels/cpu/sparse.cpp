// effx family: DejaVu contextual sparsity, multithreaded CPU kernels (layout in
// include/effx/sparse.h).
//
// Up: a unit of work is a run of selected weight rows; each row is streamed once, widened to
// fp32 in registers and dotted with up to 4 batch rows at a time (a shared index set reads
// every weight row from memory once per call; the fp32 batch rows stay in cache). The next
// row is prefetched, since gathered rows jump around memory.
// Down: a unit of work is a fixed slice of kColumns output columns of one index set; the thread
// that owns it adds the selected rows in index order into fp32 accumulators, kRowBlock rows
// per pass with kLanes columns held in registers. Column slices do
// not depend on the thread count, so every output element sees the same additions in the same
// order on any number of threads: bitwise reproducible, no atomics.
// bf16 batches of 16 rows or more with one index set run both projections as GEMMs on bf16
// pairs instead (up_pairs, down_pairs), with the same column slices in the down projection.
#include "effx/sparse.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "bf16_gemm.h"
#include "half_bits.h"
#include "line_aligned.h"

// The hot loops are compiled for AVX-512 and AVX2 as well as the baseline; the loader picks the
// best one the CPU supports (the choice is fixed per machine, so results stay reproducible).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define EFFX_SPARSE_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define EFFX_SPARSE_CLONES
#endif

namespace effx {
namespace cpu {
namespace {

// Below this many multiply-adds the thread start-up costs more than the work.
constexpr int64_t kSerialWork = 1 << 16;
// Accumulators per dot product: 64 fp32 lanes are 4 AVX-512 or 8 AVX2 registers, enough
// independent chains to hide the FMA latency; batch rows share them (64 / rows each).
constexpr int kLanes = 64;
// Output columns owned by one unit of down-projection work (a multiple of kLanes).
constexpr int64_t kColumns = 256;
// Selected rows of the down projection added per pass over the accumulators.
constexpr int64_t kRowBlock = 16;
// Selected weight rows per unit of up-projection work.
constexpr int64_t kRowsPerUnit = 8;
constexpr int64_t kCacheLine = 64;

int threads_for(int64_t work, int num_threads) {
  return work < kSerialWork ? 1 : std::max(1, num_threads);
}

template <typename T>
EFFX_SPARSE_CLONES void widen_row(const T* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}

// Ask for `bytes` from p before they are needed: gathered rows jump around memory, which the
// hardware prefetchers cannot guess.
inline void prefetch(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += kCacheLine) __builtin_prefetch(c + off, 0, 1);
}

// 16 fp32 lanes: one AVX-512 register, two AVX2 or four SSE registers depending on the clone.
// Written with vector types because GCC's auto-vectorizer turns these nests into scalar code.
typedef float Floats __attribute__((vector_size(64)));
typedef uint32_t Words __attribute__((vector_size(64)));
typedef int32_t Ints __attribute__((vector_size(64)));
typedef uint16_t Halves __attribute__((vector_size(32)));

#define EFFX_INLINE inline __attribute__((always_inline))
// These helpers are always inlined, so the ABI of 64-byte vector arguments never matters.
#pragma GCC diagnostic ignored "-Wpsabi"

EFFX_INLINE Floats load16(const float* p) {
  Floats v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

EFFX_INLINE Floats as_floats(Words u) {
  Floats f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

EFFX_INLINE Words load16_bits(const void* p) {
  Halves h;
  std::memcpy(&h, p, sizeof h);
  return __builtin_convertvector(h, Words);
}

EFFX_INLINE Floats load16(const BFloat16* p) { return as_floats(load16_bits(p) << 16); }

EFFX_INLINE Floats load16(const Half* p) {
  return as_floats(fp16_to_fp32_bits<Words, Ints, Floats>(load16_bits(p)));
}

EFFX_INLINE float lane_sum(Floats v) {
  float s = 0.0f;
  for (int l = 0; l < 16; ++l) s += v[l];
  return s;
}

// out[t] = x_t . w for BT vectors x_t of length n; every x_t shares each load (and widening)
// of the weight row w. 4 / BT accumulators per row keep 4 FMA chains in flight.
template <int BT, typename T>
EFFX_SPARSE_CLONES void dot_tile(const float* const* x, const T* w, int64_t n, float* out) {
  constexpr int V = 4 / BT;
  constexpr int64_t kStep = 16 * V;
  Floats acc[BT][V] = {};
  const int64_t body = n - n % kStep;
  for (int64_t c = 0; c < body; c += kStep) {
    Floats wv[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) wv[v] = load16(w + c + 16 * v);
#pragma GCC unroll 4
    for (int t = 0; t < BT; ++t) {
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[t][v] += load16(x[t] + c + 16 * v) * wv[v];
    }
  }
  for (int t = 0; t < BT; ++t) {
    Floats a = acc[t][0];
    for (int v = 1; v < V; ++v) a += acc[t][v];
    float sum = lane_sum(a);
    for (int64_t c = body; c < n; ++c) sum += x[t][c] * to_float(w[c]);
    out[t] = sum;
  }
}

// out0[t] = x_t . w0 and out1[t] = x_t . w1 in one pass (gate and up rows of a neuron): each
// load of x_t feeds two FMAs, which is what limits the dot products at batch > 1.
template <int BT, typename T>
EFFX_SPARSE_CLONES void dot_tile_pair(const float* const* x, const T* w0, const T* w1, int64_t n,
                                      float* out0, float* out1) {
  constexpr int V = BT == 1 ? 2 : 1;
  constexpr int64_t kStep = 16 * V;
  Floats acc0[BT][V] = {}, acc1[BT][V] = {};
  const int64_t body = n - n % kStep;
  for (int64_t c = 0; c < body; c += kStep) {
    Floats a[V], b[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      a[v] = load16(w0 + c + 16 * v);
      b[v] = load16(w1 + c + 16 * v);
    }
#pragma GCC unroll 4
    for (int t = 0; t < BT; ++t) {
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) {
        const Floats xv = load16(x[t] + c + 16 * v);
        acc0[t][v] += xv * a[v];
        acc1[t][v] += xv * b[v];
      }
    }
  }
  for (int t = 0; t < BT; ++t) {
    Floats a = acc0[t][0], b = acc1[t][0];
    for (int v = 1; v < V; ++v) {
      a += acc0[t][v];
      b += acc1[t][v];
    }
    float s0 = lane_sum(a), s1 = lane_sum(b);
    for (int64_t c = body; c < n; ++c) {
      s0 += x[t][c] * to_float(w0[c]);
      s1 += x[t][c] * to_float(w1[c]);
    }
    out0[t] = s0;
    out1[t] = s1;
  }
}

// dot_tile_pair for `rows` (1..4) vectors, padded like dot_rows.
template <typename T>
void dot_rows_pair(const float* const* x, int rows, const T* w0, const T* w1, int64_t n,
                   float* out0, float* out1) {
  const float* xs[4] = {x[0], x[0], x[0], x[0]};
  for (int t = 0; t < rows; ++t) xs[t] = x[t];
  float t0[4], t1[4];
  if (rows == 1) {
    dot_tile_pair<1>(xs, w0, w1, n, t0, t1);
  } else if (rows == 2) {
    dot_tile_pair<2>(xs, w0, w1, n, t0, t1);
  } else {
    dot_tile_pair<4>(xs, w0, w1, n, t0, t1);
  }
  for (int t = 0; t < rows; ++t) {
    out0[t] = t0[t];
    out1[t] = t1[t];
  }
}

// out[t] = x_t . w for `rows` (1..4) vectors: pads to a tile of 1, 2 or 4 rows with x_0.
template <typename T>
void dot_rows(const float* const* x, int rows, const T* w, int64_t n, float* out) {
  const float* xs[4] = {x[0], x[0], x[0], x[0]};
  for (int t = 0; t < rows; ++t) xs[t] = x[t];
  float tmp[4];
  if (rows == 1) {
    dot_tile<1>(xs, w, n, tmp);
  } else if (rows == 2) {
    dot_tile<2>(xs, w, n, tmp);
  } else {
    dot_tile<4>(xs, w, n, tmp);
  }
  for (int t = 0; t < rows; ++t) out[t] = tmp[t];
}

// acc[c] += sum over j < rows, in order, of v[j] * w[j][c], for c < n: a block of selected
// row segments added into one batch row's accumulators, kLanes columns held in registers.
template <typename T>
EFFX_SPARSE_CLONES void add_rows(const float* v, const T* const* w, int64_t rows, int64_t n,
                                 float* acc) {
  constexpr int V = kLanes / 16;
  const int64_t body = n - n % kLanes;
  for (int64_t c = 0; c < body; c += kLanes) {
    Floats a[V];
#pragma GCC unroll 4
    for (int q = 0; q < V; ++q) a[q] = load16(acc + c + 16 * q);
    for (int64_t j = 0; j < rows; ++j) {
      const float vj = v[j];
#pragma GCC unroll 4
      for (int q = 0; q < V; ++q) a[q] += vj * load16(w[j] + c + 16 * q);
    }
#pragma GCC unroll 4
    for (int q = 0; q < V; ++q) std::memcpy(acc + c + 16 * q, &a[q], sizeof a[q]);
  }
  for (int64_t c = body; c < n; ++c) {
    float a = acc[c];
    for (int64_t j = 0; j < rows; ++j) a += v[j] * to_float(w[j][c]);
    acc[c] = a;
  }
}

inline float activate(Activation act, float v) {
  switch (act) {
    case Activation::None: return v;
    case Activation::Relu: return v > 0.0f ? v : 0.0f;
    case Activation::Gelu: return 0.5f * v * (1.0f + std::erf(v * 0.70710678118654752f));
    case Activation::GeluTanh: {
      const float inner = 0.79788456080286536f * (v + 0.044715f * v * v * v);
      return 0.5f * v * (1.0f + std::tanh(inner));
    }
    case Activation::Silu: return v / (1.0f + std::exp(-v));
  }
  return v;
}

template <typename T>
void up_impl(const SparseUpShape& s, Activation act, const T* x, const T* w_up, const T* w_gate,
             const T* b_up, const T* b_gate, const int64_t* idx, T* h, int num_threads) {
  const int64_t R = s.rows_per_index;
  const int64_t K = s.k * R;  // selected rows per index set
  const int64_t d = s.d;
  const bool shared = s.idx_row_stride == 0;
  const int64_t sets = shared ? 1 : s.batch;
  const int64_t units_per_set = (K + kRowsPerUnit - 1) / kRowsPerUnit;
  const int threads = threads_for(s.batch * K * d * (w_gate ? 2 : 1), num_threads);

  // The batch in fp32, converted once: every selected row is dotted with it.
  std::vector<float> xf(static_cast<size_t>(s.batch * d));
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t b = 0; b < s.batch; ++b) {
    const T* xr = x + b * s.x_row_stride;
    float* dst = xf.data() + b * d;
    if constexpr (std::is_same_v<T, float>) {
      std::copy(xr, xr + d, dst);
    } else {
      widen_row(xr, d, dst);
    }
  }

#pragma omp parallel num_threads(threads)
  {
    float up[4], gate[4];
#pragma omp for schedule(static)
    for (int64_t u = 0; u < sets * units_per_set; ++u) {
      const int64_t set = u / units_per_set;
      const int64_t first = (u % units_per_set) * kRowsPerUnit;
      const int64_t last = std::min(first + kRowsPerUnit, K);
      const int64_t* ids = idx + set * s.idx_row_stride;
      // Batch rows that read this index set: all of them when it is shared, else row `set`.
      const int64_t b0 = shared ? 0 : set;
      const int64_t b1 = shared ? s.batch : set + 1;
      for (int64_t j = first; j < last; ++j) {
        const int64_t row = ids[j / R] * R + j % R;
        if (j + 1 < K) {
          const int64_t next = ids[(j + 1) / R] * R + (j + 1) % R;
          prefetch(w_up + next * s.w_row_stride, d * static_cast<int64_t>(sizeof(T)));
          if (w_gate) prefetch(w_gate + next * s.w_row_stride, d * static_cast<int64_t>(sizeof(T)));
        }
        const T* wu = w_up + row * s.w_row_stride;
        const T* wg = w_gate ? w_gate + row * s.w_row_stride : nullptr;
        const float bu = b_up ? to_float(b_up[row]) : 0.0f;
        const float bg = b_gate ? to_float(b_gate[row]) : 0.0f;
        for (int64_t b = b0; b < b1; b += 4) {
          const int rows = static_cast<int>(std::min<int64_t>(4, b1 - b));
          const float* xs[4];
          for (int t = 0; t < rows; ++t) xs[t] = xf.data() + (b + t) * d;
          if (wg) {
            dot_rows_pair(xs, rows, wu, wg, d, up, gate);
          } else {
            dot_rows(xs, rows, wu, d, up);
          }
          for (int t = 0; t < rows; ++t) {
            const float v = wg ? activate(act, gate[t] + bg) * (up[t] + bu) : activate(act, up[t] + bu);
            h[(b + t) * K + j] = from_float<T>(v);
          }
        }
      }
    }
  }
}

template <typename T>
void down_impl(const SparseDownShape& s, const T* h, const T* w, const T* bias,
               const int64_t* idx, T* y, int num_threads) {
  const int64_t R = s.rows_per_index;
  const int64_t K = s.k * R;
  const int64_t d = s.d;
  const bool shared = s.idx_row_stride == 0;
  const int64_t sets = shared ? 1 : s.batch;
  const int64_t rows_per_set = shared ? s.batch : 1;
  const int64_t slices = (d + kColumns - 1) / kColumns;
  const int threads = threads_for(s.batch * K * d, num_threads);

  std::vector<float> hf(static_cast<size_t>(s.batch * K));
  for (int64_t b = 0; b < s.batch; ++b) {
    for (int64_t j = 0; j < K; ++j) hf[b * K + j] = to_float(h[b * s.h_row_stride + j]);
  }

#pragma omp parallel num_threads(threads)
  {
    std::vector<float> acc(static_cast<size_t>(rows_per_set * kColumns));
    const T* block[kRowBlock];
    float hv[kRowBlock];
#pragma omp for schedule(static)
    for (int64_t u = 0; u < sets * slices; ++u) {
      const int64_t set = u / slices;
      const int64_t c0 = (u % slices) * kColumns;
      const int64_t len = std::min(kColumns, d - c0);
      const int64_t* ids = idx + set * s.idx_row_stride;
      const int64_t b0 = shared ? 0 : set;
      auto row_of = [&](int64_t j) { return ids[j / R] * R + j % R; };
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t j0 = 0; j0 < K; j0 += kRowBlock) {
        const int64_t rows = std::min(kRowBlock, K - j0);
        for (int64_t j = j0 + kRowBlock; j < std::min(j0 + 2 * kRowBlock, K); ++j) {
          prefetch(w + row_of(j) * s.w_row_stride + c0, len * static_cast<int64_t>(sizeof(T)));
        }
        for (int64_t j = 0; j < rows; ++j) block[j] = w + row_of(j0 + j) * s.w_row_stride + c0;
        for (int64_t t = 0; t < rows_per_set; ++t) {
          for (int64_t j = 0; j < rows; ++j) hv[j] = hf[(b0 + t) * K + j0 + j];
          add_rows(hv, block, rows, len, acc.data() + t * kColumns);
        }
      }
      for (int64_t t = 0; t < rows_per_set; ++t) {
        T* yr = y + (b0 + t) * d + c0;
        const float* a = acc.data() + t * kColumns;
        for (int64_t c = 0; c < len; ++c) {
          yr[c] = from_float<T>(bias ? a[c] + to_float(bias[c0 + c]) : a[c]);
        }
      }
    }
  }
}

// bf16 with one index set for a batch of at least bf16::kMinRows rows, on CPUs with
// AVX512_BF16: both projections as GEMMs on bf16 pairs (bf16_gemm.h, on AMX tiles where the CPU
// has them), the selected weight rows packed per unit of work. Fewer rows stay on the dot
// products above, which read each weight once at the rate memory gives it. The batch is copied
// into pairs (a zero pad for odd lengths), so x and h need no alignment.
// Selected neurons per up unit; output columns per down unit are kColumns, its selected rows
// added kPairRows at a time (a packed panel block that stays in L2).
constexpr int64_t kPairNeurons = 64;
constexpr int64_t kPairRows = 256;

bool pairs_apply(int64_t batch, bool shared) {
  return shared && batch >= bf16::kMinRows && bf16::available();
}

// The rows of m (n values each, at stride ld) as bf16 pairs: contiguous rows of
// round_up(n, 2) values, a zero in the pad (so an odd reduction reads 0 x 0).
LineVector<uint32_t> as_pairs(const BFloat16* m, int64_t rows, int64_t n, int64_t ld) {
  const int64_t np = (n + 1) / 2;
  LineVector<uint32_t> out(rows * np, 0u);
  for (int64_t r = 0; r < rows; ++r) std::memcpy(out.data() + r * np, m + r * ld, n * sizeof(BFloat16));
  return out;
}

void up_pairs(const SparseUpShape& s, Activation act, const BFloat16* x, const BFloat16* w_up,
              const BFloat16* w_gate, const BFloat16* b_up, const BFloat16* b_gate, const int64_t* idx,
              BFloat16* h, int num_threads) {
  const int64_t R = s.rows_per_index, K = s.k * R, DP = s.d / 2;
  const LineVector<uint32_t> xp = as_pairs(x, s.batch, s.d, s.x_row_stride);
  const int64_t units = (K + kPairNeurons - 1) / kPairNeurons;
#pragma omp parallel num_threads(threads_for(s.batch * K * s.d, num_threads))
  {
    LineVector<uint32_t> packed(bf16::packed_words(kPairNeurons, DP));
    std::vector<float> up(s.batch * kPairNeurons), gate(w_gate ? s.batch * kPairNeurons : 0);
    const BFloat16* rows[kPairNeurons];
#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < units; ++u) {
      const int64_t j0 = u * kPairNeurons, nj = std::min(kPairNeurons, K - j0);
      auto row_of = [&](int64_t j) { return idx[j / R] * R + j % R; };
      for (int64_t j = 0; j < nj; ++j) rows[j] = w_up + row_of(j0 + j) * s.w_row_stride;
      bf16::pack_columns(nj, DP, rows, packed.data());
      bf16::gemm(s.batch, nj, DP, xp.data(), DP, packed.data(), 1.0f, up.data(), kPairNeurons, false);
      if (w_gate) {
        for (int64_t j = 0; j < nj; ++j) rows[j] = w_gate + row_of(j0 + j) * s.w_row_stride;
        bf16::pack_columns(nj, DP, rows, packed.data());
        bf16::gemm(s.batch, nj, DP, xp.data(), DP, packed.data(), 1.0f, gate.data(), kPairNeurons, false);
      }
      for (int64_t j = 0; j < nj; ++j) {
        const int64_t row = row_of(j0 + j);
        const float bu = b_up ? to_float(b_up[row]) : 0.0f;
        const float bg = b_gate ? to_float(b_gate[row]) : 0.0f;
        for (int64_t b = 0; b < s.batch; ++b) {
          const float vu = up[b * kPairNeurons + j] + bu;
          const float v = w_gate ? activate(act, gate[b * kPairNeurons + j] + bg) * vu : activate(act, vu);
          h[b * K + j0 + j] = from_float<BFloat16>(v);
        }
      }
    }
  }
}

void down_pairs(const SparseDownShape& s, const BFloat16* h, const BFloat16* w, const BFloat16* bias,
                const int64_t* idx, BFloat16* y, int num_threads) {
  const int64_t R = s.rows_per_index, K = s.k * R, KP = (K + 1) / 2;
  const LineVector<uint32_t> hp = as_pairs(h, s.batch, K, s.h_row_stride);
  const int64_t slices = (s.d + kColumns - 1) / kColumns;
#pragma omp parallel num_threads(threads_for(s.batch * K * s.d, num_threads))
  {
    LineVector<uint32_t> packed(bf16::packed_words(kColumns, kPairRows / 2));
    std::vector<float> acc(s.batch * kColumns);
    std::vector<const BFloat16*> rows(kPairRows);
#pragma omp for schedule(static)
    for (int64_t u = 0; u < slices; ++u) {
      const int64_t c0 = u * kColumns, len = std::min(kColumns, s.d - c0);
      // Fixed blocks of selected rows, in index order: the same additions on any thread count.
      for (int64_t j0 = 0; j0 < K; j0 += kPairRows) {
        const int64_t nj = std::min(kPairRows, K - j0);
        for (int64_t j = 0; j < nj; ++j) rows[j] = w + (idx[(j0 + j) / R] * R + (j0 + j) % R) * s.w_row_stride + c0;
        bf16::pack_rows(nj, len, rows.data(), packed.data());
        bf16::gemm(s.batch, len, (nj + 1) / 2, hp.data() + j0 / 2, KP, packed.data(), 1.0f, acc.data(), kColumns,
                   j0 > 0);
      }
      for (int64_t b = 0; b < s.batch; ++b) {
        for (int64_t c = 0; c < len; ++c) {
          const float v = acc[b * kColumns + c];
          y[b * s.d + c0 + c] = from_float<BFloat16>(bias ? v + to_float(bias[c0 + c]) : v);
        }
      }
    }
  }
}

}  // namespace

IndexCheck check_indices(const int64_t* idx, int64_t sets, int64_t k, int64_t set_stride,
                         int64_t units) {
  std::vector<uint64_t> seen(static_cast<size_t>((units + 63) / 64));
  for (int64_t s = 0; s < sets; ++s) {
    const int64_t* ids = idx + s * set_stride;
    std::fill(seen.begin(), seen.end(), 0u);
    for (int64_t j = 0; j < k; ++j) {
      const int64_t v = ids[j];
      if (v < 0 || v >= units) return {IndexProblem::OutOfRange, s, j, v};
      const uint64_t bit = uint64_t{1} << (v % 64);
      if (seen[v / 64] & bit) return {IndexProblem::Duplicate, s, j, v};
      seen[v / 64] |= bit;
    }
  }
  return {IndexProblem::None, 0, 0, 0};
}

void sparse_mlp_up(const SparseUpShape& s, DType dtype, Activation act, const void* x,
                   const void* w_up, const void* w_gate, const void* b_up, const void* b_gate,
                   const int64_t* idx, void* h, int num_threads) {
  if (s.batch == 0 || s.k == 0) return;
  switch (dtype) {
    case DType::Float32:
      return up_impl(s, act, static_cast<const float*>(x), static_cast<const float*>(w_up),
                     static_cast<const float*>(w_gate), static_cast<const float*>(b_up),
                     static_cast<const float*>(b_gate), idx, static_cast<float*>(h), num_threads);
    case DType::Float16:
      return up_impl(s, act, static_cast<const Half*>(x), static_cast<const Half*>(w_up),
                     static_cast<const Half*>(w_gate), static_cast<const Half*>(b_up),
                     static_cast<const Half*>(b_gate), idx, static_cast<Half*>(h), num_threads);
    case DType::BFloat16:
      if (pairs_apply(s.batch, s.idx_row_stride == 0) && s.d % 2 == 0) {
        return up_pairs(s, act, static_cast<const BFloat16*>(x), static_cast<const BFloat16*>(w_up),
                        static_cast<const BFloat16*>(w_gate), static_cast<const BFloat16*>(b_up),
                        static_cast<const BFloat16*>(b_gate), idx, static_cast<BFloat16*>(h), num_threads);
      }
      return up_impl(s, act, static_cast<const BFloat16*>(x), static_cast<const BFloat16*>(w_up),
                     static_cast<const BFloat16*>(w_gate), static_cast<const BFloat16*>(b_up),
                     static_cast<const BFloat16*>(b_gate), idx, static_cast<BFloat16*>(h),
                     num_threads);
    case DType::Float64: break;  // not a storage dtype of this family (the op layer rejects it)
  }
}

void sparse_mlp_down(const SparseDownShape& s, DType dtype, const void* h, const void* w_down_t,
                     const void* b_down, const int64_t* idx, void* y, int num_threads) {
  if (s.batch == 0 || s.d == 0) return;
  switch (dtype) {
    case DType::Float32:
      return down_impl(s, static_cast<const float*>(h), static_cast<const float*>(w_down_t),
                       static_cast<const float*>(b_down), idx, static_cast<float*>(y), num_threads);
    case DType::Float16:
      return down_impl(s, static_cast<const Half*>(h), static_cast<const Half*>(w_down_t),
                       static_cast<const Half*>(b_down), idx, static_cast<Half*>(y), num_threads);
    case DType::BFloat16:
      if (pairs_apply(s.batch, s.idx_row_stride == 0)) {
        return down_pairs(s, static_cast<const BFloat16*>(h), static_cast<const BFloat16*>(w_down_t),
                          static_cast<const BFloat16*>(b_down), idx, static_cast<BFloat16*>(y), num_threads);
      }
      return down_impl(s, static_cast<const BFloat16*>(h), static_cast<const BFloat16*>(w_down_t),
                       static_cast<const BFloat16*>(b_down), idx, static_cast<BFloat16*>(y),
                       num_threads);
    case DType::Float64: break;  // not a storage dtype of this family (the op layer rejects it)
  }
}

}  // namespace cpu
}  // namespace effx
