// effx C++ test: the CUDA cache attention agrees with the CPU engine on the same inputs:
// dense and H2O (with scores), KIVI over the same quantized storage at 2 and 4 bits, and the
// KIVI append against the CPU append. Decode rows with GQA groups 1, 4 and 8, causal chunks,
// token trees, ragged rows with padded new tokens, contexts long enough to split across
// blocks, sliding windows (over trees too), the LSE output, every storage dtype, head dims 64 and 128 and one that is no
// multiple of 8: so the decode path, the tensor-core path and the fp32 engine all run. Runs on a GPU, or on the SIMT emulator (test_attention_simt); exits 77
// (ctest: skipped) when neither is there.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "check.h"
#include "cuda_buffers.h"
#include "effx/attention_cuda.h"
#include "effx/h2o_cuda.h"
#include "effx/kivi_cuda.h"

namespace {

using effx::DType;

struct Shape {
  int64_t B, H, HQ, D, C, q_len;
  std::vector<int64_t> lengths;
  bool tree, padded;  // padded: row 0 has fewer valid new tokens than q_len
  int64_t window = 0;  // sliding window (dense and KIVI)
};

template <typename T>
std::vector<T> random_values(size_t n, std::mt19937& rng, float sd = 1.0f) {
  std::normal_distribution<float> dist(0.0f, sd);
  std::vector<T> v(n);
  for (auto& e : v) e = effx::from_float<T>(dist(rng));
  return v;
}

template <typename T>
double relative_error(const std::vector<T>& got, const std::vector<T>& want) {
  double err = 0, norm = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double g = effx::to_float(got[i]), w = effx::to_float(want[i]);
    err += (g - w) * (g - w);
    norm += w * w;
  }
  return std::sqrt(err / (norm > 0 ? norm : 1));
}

double tolerance(DType t) { return t == DType::Float32 ? 2e-5 : t == DType::Float16 ? 2e-3 : 1.6e-2; }

// The step's queries and new tokens, with the row lengths, padding and tree.
template <typename T>
struct Step {
  std::vector<T> q, kn, vn;
  std::vector<int64_t> lengths, new_lengths, parents;

  Step(const Shape& s, std::mt19937& rng)
      : q(random_values<T>(s.B * s.HQ * s.q_len * s.D, rng)),
        kn(random_values<T>(s.B * s.H * s.q_len * s.D, rng)),
        vn(random_values<T>(s.B * s.H * s.q_len * s.D, rng)),
        lengths(s.lengths),
        new_lengths(s.B, s.q_len),
        parents(s.q_len) {
    if (s.padded) new_lengths[0] = s.q_len / 2;
    for (int64_t i = 0; i < s.q_len; ++i) parents[i] = i == 0 ? -1 : static_cast<int64_t>(rng() % i);
  }
};

effx::AttentionArgs step_args(const Shape& s, const void* q, const void* kn, const void* vn, void* out, float* lse,
                              const int64_t* lengths, const int64_t* new_lengths, const int64_t* parents) {
  effx::AttentionArgs a{};
  a.batch = s.B;
  a.q_heads = s.HQ;
  a.kv_heads = s.H;
  a.q_len = s.q_len;
  a.head_dim = s.D;
  a.q = {q, s.HQ * s.q_len * s.D, s.q_len * s.D, s.D};
  a.k_new = {kn, s.H * s.q_len * s.D, s.q_len * s.D, s.D};
  a.v_new = {vn, s.H * s.q_len * s.D, s.q_len * s.D, s.D};
  a.out = out;
  a.lse = lse;
  a.lengths = lengths;
  a.lengths_stride = 1;
  a.new_lengths = s.padded ? new_lengths : nullptr;
  a.parents = s.tree ? parents : nullptr;
  a.causal = true;
  a.sm_scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(s.D)));
  a.max_cached = s.C;
  a.window = s.window;
  return a;
}

void compare_lse(const std::vector<float>& got, const std::vector<float>& want, double tol, const char* what) {
  for (size_t i = 0; i < got.size(); ++i) {
    const bool both_empty = std::isinf(got[i]) && std::isinf(want[i]) && got[i] < 0 && want[i] < 0;
    EFFX_EXPECT(both_empty || std::abs(got[i] - want[i]) <= tol * (1 + std::abs(want[i])), "%s: lse[%zu] %g vs %g",
                what, i, got[i], want[i]);
  }
}

// Dense cache attention, and with `scores` the H2O attention that also accumulates them.
template <typename T>
void dense(DType dtype, const Shape& s, bool scores) {
  std::mt19937 rng(static_cast<unsigned>(s.D * 7919 + s.q_len * 31 + s.HQ + scores));
  const Step<T> st(s, rng);
  const std::vector<T> k = random_values<T>(s.B * s.H * s.C * s.D, rng), v = random_values<T>(k.size(), rng);
  const size_t outs = s.B * s.HQ * s.q_len * s.D, rows = s.B * s.HQ * s.q_len, slots = s.B * s.H * s.C;
  std::vector<T> out(outs);
  std::vector<float> lse(rows), sc(slots);
  for (auto& x : sc) x = static_cast<float>(rng() % 100) / 50.0f;  // earlier steps' sums
  const std::vector<float> sc0 = sc;

  effx::AttentionArgs a = step_args(s, st.q.data(), st.kn.data(), st.vn.data(), out.data(), lse.data(),
                                    st.lengths.data(), st.new_lengths.data(), st.parents.data());
  if (scores) a.scores = sc.data(), a.scores_sb = s.H * s.C, a.scores_sh = s.C;
  effx::cpu::dense_attention(a, effx::DenseKV{k.data(), v.data(), s.H * s.C * s.D, s.C * s.D, s.D}, dtype, 2);

  T *dq = to_device(st.q), *dkn = to_device(st.kn), *dvn = to_device(st.vn), *dk = to_device(k), *dv = to_device(v);
  T* dout = to_device(std::vector<T>(outs));
  float *dlse = to_device(std::vector<float>(rows)), *dsc = to_device(sc0);
  int64_t *dlen = to_device(st.lengths), *dnew = to_device(st.new_lengths), *dpar = to_device(st.parents);
  effx::AttentionArgs g = step_args(s, dq, dkn, dvn, dout, dlse, dlen, dnew, dpar);
  if (scores) g.scores = dsc, g.scores_sb = s.H * s.C, g.scores_sh = s.C;
  char* ws = to_device(std::vector<char>(effx::cuda::attention_workspace_bytes(g)));
  const effx::DenseKV kv{dk, dv, s.H * s.C * s.D, s.C * s.D, s.D};
  CUDA_OK(scores ? effx::cuda::h2o_attention(g, kv, dtype, ws, nullptr)
                 : effx::cuda::dense_attention(g, kv, dtype, ws, nullptr));
  CUDA_OK(cudaDeviceSynchronize());

  const double rel = relative_error(to_host(dout, outs), out);
  EFFX_EXPECT(rel < tolerance(dtype), "dense %s D=%lld Hq=%lld q_len=%lld tree=%d window=%lld scores=%d: relative error %g",
              effx::dtype_name(dtype), (long long)s.D, (long long)s.HQ, (long long)s.q_len, s.tree,
              (long long)s.window, scores, rel);
  compare_lse(to_host(dlse, rows), lse, 1e-4, "dense");
  if (scores) {
    const auto got = to_host(dsc, slots);
    for (size_t i = 0; i < slots; ++i) {
      EFFX_EXPECT(std::abs(got[i] - sc[i]) <= 2e-4 * (1 + std::abs(sc[i])), "h2o %s: score[%zu] %g vs %g",
                  effx::dtype_name(dtype), i, got[i], sc[i]);
    }
  }
  for (void* p : {(void*)dq, (void*)dkn, (void*)dvn, (void*)dk, (void*)dv, (void*)dout, (void*)dlse, (void*)dsc,
                  (void*)dlen, (void*)dnew, (void*)dpar, (void*)ws}) {
    CUDA_OK(cudaFree(p));
  }
}

// One KIVI layer's buffers (include/effx/kivi.h) on the host.
template <typename T>
struct KiviHost {
  std::vector<int32_t> k_codes, v_codes;
  std::vector<T> k_scale, k_zero, v_scale, v_zero, k_res, v_res;
  std::vector<int64_t> state;
  KiviHost(const Shape& s, int bits, int64_t R, int64_t G)
      : k_codes(s.B * s.H * s.D * s.C * bits / 32),
        v_codes(s.B * s.H * s.C * s.D * bits / 32),
        k_scale(s.B * s.H * s.D * (s.C / G)),
        k_zero(k_scale.size()),
        v_scale(s.B * s.H * s.C * (s.D / G)),
        v_zero(v_scale.size()),
        k_res(s.B * s.H * s.D * R),
        v_res(s.B * s.H * R * s.D),
        state(s.B * 3) {}
};

template <typename T>
struct KiviDevice {
  int32_t *k_codes, *v_codes;
  T *k_scale, *k_zero, *v_scale, *v_zero, *k_res, *v_res;
  int64_t* state;
  explicit KiviDevice(const KiviHost<T>& h)
      : k_codes(to_device(h.k_codes)),
        v_codes(to_device(h.v_codes)),
        k_scale(to_device(h.k_scale)),
        k_zero(to_device(h.k_zero)),
        v_scale(to_device(h.v_scale)),
        v_zero(to_device(h.v_zero)),
        k_res(to_device(h.k_res)),
        v_res(to_device(h.v_res)),
        state(to_device(h.state)) {}
  KiviHost<T> copy_back(const KiviHost<T>& like) const {
    KiviHost<T> h = like;
    h.k_codes = to_host(k_codes, like.k_codes.size());
    h.v_codes = to_host(v_codes, like.v_codes.size());
    h.k_scale = to_host(k_scale, like.k_scale.size());
    h.k_zero = to_host(k_zero, like.k_zero.size());
    h.v_scale = to_host(v_scale, like.v_scale.size());
    h.v_zero = to_host(v_zero, like.v_zero.size());
    h.k_res = to_host(k_res, like.k_res.size());
    h.v_res = to_host(v_res, like.v_res.size());
    h.state = to_host(state, like.state.size());
    return h;
  }
  void free() const {
    for (void* p : {(void*)k_codes, (void*)v_codes, (void*)k_scale, (void*)k_zero, (void*)v_scale, (void*)v_zero,
                    (void*)k_res, (void*)v_res, (void*)state}) {
      CUDA_OK(cudaFree(p));
    }
  }
};

template <typename T>
effx::KiviStorage kivi_storage(const Shape& s, int bits, int64_t R, int64_t G, KiviHost<T>& b) {
  return effx::KiviStorage{s.B, s.H, s.D, s.C, R, bits, static_cast<int>(G), b.k_codes.data(), b.k_scale.data(),
                           b.k_zero.data(), b.v_codes.data(), b.v_scale.data(), b.v_zero.data(), b.k_res.data(),
                           b.v_res.data(), b.state.data()};
}

template <typename T>
effx::KiviStorage kivi_storage(const Shape& s, int bits, int64_t R, int64_t G, const KiviDevice<T>& b) {
  return effx::KiviStorage{s.B, s.H, s.D, s.C, R, bits, static_cast<int>(G), b.k_codes, b.k_scale, b.k_zero,
                           b.v_codes, b.v_scale, b.v_zero, b.k_res, b.v_res, b.state};
}

// Appends chunks of new tokens to both a CPU and a CUDA copy (the CUDA append must leave the
// same state, residual, scales and zeros, and codes off by at most one where rounding ties),
// then attends over the CPU-built storage on both.
template <typename T>
void kivi(DType dtype, const Shape& s, int bits) {
  const int64_t R = 64, G = 32;
  std::mt19937 rng(static_cast<unsigned>(s.D * 13 + bits + s.HQ));
  KiviHost<T> host(s, bits, R, G);
  for (int64_t b = 0; b < s.B; ++b) {
    const int64_t tokens = s.lengths[b];
    std::vector<T> k = random_values<T>(s.H * tokens * s.D, rng), v = random_values<T>(k.size(), rng);
    Shape one = s;
    one.B = 1;
    KiviHost<T> row(one, bits, R, G);
    const effx::KiviStorage rs = kivi_storage(one, bits, R, G, row);
    const effx::Strided kn{k.data(), s.H * tokens * s.D, tokens * s.D, s.D}, vn{v.data(), kn.sb, kn.sh, kn.st};
    // Row by row through both appends: a prefill chunk, three single decode tokens over the
    // residual it left, then a chunk that flushes keys and values again.
    KiviDevice<T> dev(row);
    T *dk = to_device(k), *dv = to_device(v);
    const int64_t rest = tokens / 3, first = std::max<int64_t>(0, tokens - rest - 3);
    std::vector<int64_t> chunks = {first};
    for (int64_t t = first; t < std::min(tokens, first + 3); ++t) chunks.push_back(1);
    chunks.push_back(tokens - std::min(tokens, first + 3));
    int64_t c0 = 0;
    for (const int64_t len : chunks) {
      const auto view = [&](const T* base) { return effx::Strided{base + c0 * s.D, kn.sb, kn.sh, kn.st}; };
      CUDA_OK(effx::cuda::kivi_append(kivi_storage(one, bits, R, G, dev), dtype, view(dk), view(dv), len, nullptr,
                                      nullptr));
      effx::cpu::kivi_append(rs, dtype, view(k.data()), view(v.data()), len, nullptr, 2);
      c0 += len;
    }
    const KiviHost<T> got = dev.copy_back(row);
    EFFX_EXPECT(got.state == row.state, "kivi append: state differs");
    const int64_t n = row.state[0], kq = row.state[1], vq = row.state[2];
    for (int64_t h = 0; h < s.H; ++h) {  // the live residual slots
      for (int64_t d = 0; d < s.D; ++d) {
        for (int64_t t = kq; t < n; ++t) {
          const size_t i = (h * s.D + d) * R + t % R;
          EFFX_EXPECT(std::memcmp(&got.k_res[i], &row.k_res[i], sizeof(T)) == 0, "kivi append: key residual %lld", (long long)t);
        }
        for (int64_t t = vq; t < n; ++t) {
          const size_t i = (h * R + t % R) * s.D + d;
          EFFX_EXPECT(std::memcmp(&got.v_res[i], &row.v_res[i], sizeof(T)) == 0, "kivi append: value residual %lld", (long long)t);
        }
      }
    }
    for (size_t i = 0; i < row.k_scale.size(); ++i) {
      EFFX_EXPECT(std::memcmp(&got.k_scale[i], &row.k_scale[i], sizeof(T)) == 0 &&
                      std::memcmp(&got.k_zero[i], &row.k_zero[i], sizeof(T)) == 0,
                  "kivi append %s: key group %zu", effx::dtype_name(dtype), i);
    }
    for (size_t i = 0; i < row.v_scale.size(); ++i) {
      EFFX_EXPECT(std::memcmp(&got.v_scale[i], &row.v_scale[i], sizeof(T)) == 0 &&
                      std::memcmp(&got.v_zero[i], &row.v_zero[i], sizeof(T)) == 0,
                  "kivi append %s: value group %zu", effx::dtype_name(dtype), i);
    }
    size_t off = 0, words = 0;
    for (auto* pair : {&got.k_codes, &got.v_codes}) {
      const auto& want = pair == &got.k_codes ? row.k_codes : row.v_codes;
      for (size_t i = 0; i < want.size(); ++i, ++words) {
        for (int e = 0; e < 32 / bits; ++e) {
          const int x = ((*pair)[i] >> (bits * e)) & ((1 << bits) - 1), y = (want[i] >> (bits * e)) & ((1 << bits) - 1);
          off += x != y;
          EFFX_EXPECT(std::abs(x - y) <= 1, "kivi append: code %zu.%d is %d, the CPU's %d", i, e, x, y);
        }
      }
    }
    EFFX_EXPECT(off * 1000 <= words * (32 / bits), "kivi append: %zu codes differ", off);
    dev.free();
    CUDA_OK(cudaFree(dk));
    CUDA_OK(cudaFree(dv));
    // Place the row into the batch storage.
    auto place = [&](auto& dst, const auto& src) {
      std::copy(src.begin(), src.end(), dst.begin() + b * src.size());
    };
    place(host.k_codes, row.k_codes);
    place(host.v_codes, row.v_codes);
    place(host.k_scale, row.k_scale);
    place(host.k_zero, row.k_zero);
    place(host.v_scale, row.v_scale);
    place(host.v_zero, row.v_zero);
    place(host.k_res, row.k_res);
    place(host.v_res, row.v_res);
    place(host.state, row.state);
  }

  const Step<T> st(s, rng);
  std::vector<int64_t> lengths(s.B);
  for (int64_t b = 0; b < s.B; ++b) lengths[b] = host.state[b * 3];
  const size_t outs = s.B * s.HQ * s.q_len * s.D, rows = s.B * s.HQ * s.q_len;
  std::vector<T> out(outs);
  std::vector<float> lse(rows);
  effx::AttentionArgs a = step_args(s, st.q.data(), st.kn.data(), st.vn.data(), out.data(), lse.data(),
                                    host.state.data(), st.new_lengths.data(), st.parents.data());
  a.lengths_stride = 3;
  effx::cpu::kivi_attention(a, kivi_storage(s, bits, R, G, host), dtype, 2);

  const KiviDevice<T> dev(host);
  T *dq = to_device(st.q), *dkn = to_device(st.kn), *dvn = to_device(st.vn), *dout = to_device(std::vector<T>(outs));
  float* dlse = to_device(std::vector<float>(rows));
  int64_t *dnew = to_device(st.new_lengths), *dpar = to_device(st.parents);
  effx::AttentionArgs g = step_args(s, dq, dkn, dvn, dout, dlse, dev.state, dnew, dpar);
  g.lengths_stride = 3;
  char* ws = to_device(std::vector<char>(effx::cuda::attention_workspace_bytes(g)));
  CUDA_OK(effx::cuda::kivi_attention(g, kivi_storage(s, bits, R, G, dev), dtype, ws, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  const double rel = relative_error(to_host(dout, outs), out);
  EFFX_EXPECT(rel < tolerance(dtype), "kivi-%d %s D=%lld Hq=%lld q_len=%lld tree=%d: relative error %g", bits,
              effx::dtype_name(dtype), (long long)s.D, (long long)s.HQ, (long long)s.q_len, s.tree, rel);
  // The tensor-core path dequantizes keys into the storage dtype (so does the plain PyTorch
  // way); the CPU keeps them fp32. Scores, and so the LSE, differ by that rounding.
  compare_lse(to_host(dlse, rows), lse, dtype == DType::Float32 ? 1e-4 : 4e-3, "kivi");
  dev.free();
  for (void* p : {(void*)dq, (void*)dkn, (void*)dvn, (void*)dout, (void*)dlse, (void*)dnew, (void*)dpar, (void*)ws}) {
    CUDA_OK(cudaFree(p));
  }
}

template <typename T>
void all_cases(DType dtype) {
  // B, H, HQ, D, C, q_len, lengths, tree, padded
  const std::vector<Shape> shapes = {
      {2, 2, 8, 128, 1200, 1, {1100, 37}, false, false},  // decode, group 4, split across blocks
      {3, 2, 2, 64, 300, 1, {0, 299, 128}, false, false},   // group 1, an empty row
      {1, 1, 8, 64, 700, 1, {650}, false, true},            // group 8, the row padded away
      {2, 2, 8, 128, 400, 5, {300, 90}, false, true},       // causal chunk, padded row
      {2, 2, 8, 40, 200, 3, {150, 7}, false, false},        // head dim no multiple of 8
      {1, 2, 8, 64, 800, 13, {700}, true, false},           // token tree
      {1, 2, 8, 128, 500, 40, {450}, true, false},          // a tree over several row blocks
      {2, 4, 4, 64, 600, 33, {520, 100}, false, true},      // group 1 chunk, padded row
  };
  for (const Shape& s : shapes) {
    dense<T>(dtype, s, false);
    dense<T>(dtype, s, true);
  }
  // Sliding windows: decode split across blocks, narrower than a causal chunk, a chunk over
  // several row blocks, the fp32 engine's head dim, the tensor-core path's prefill chunk;
  // token trees (a node at depth d sits at position n + d) as long as their window, where
  // depth and index disagree, on each path.
  for (const Shape& s : {Shape{2, 2, 8, 128, 1200, 1, {1100, 37}, false, false, 300},
                         Shape{2, 2, 8, 128, 400, 5, {300, 90}, false, true, 3},
                         Shape{2, 4, 4, 64, 600, 33, {520, 100}, false, true, 50},
                         Shape{2, 2, 8, 40, 200, 3, {150, 7}, false, false, 20},
                         Shape{1, 2, 8, 128, 500, 40, {450}, false, false, 64},
                         Shape{1, 2, 8, 64, 800, 13, {700}, true, false, 13},
                         Shape{1, 2, 8, 128, 500, 40, {450}, true, false, 40},
                         Shape{2, 2, 8, 40, 200, 7, {150, 7}, true, false, 9}}) {
    dense<T>(dtype, s, false);
  }
  for (const Shape& s : {Shape{2, 2, 8, 128, 1280, 1, {1100, 129}, false, false},
                         Shape{3, 2, 16, 64, 640, 1, {600, 64, 0}, false, false},  // group 8, rows at 0 and R
                         Shape{1, 4, 4, 128, 1536, 1, {1500}, false, false},       // group 1, long
                         Shape{1, 2, 4, 64, 640, 4, {600}, false, true}, Shape{1, 1, 8, 64, 320, 9, {200}, true, false},
                         // sliding windows: decode on the codes, a chunk through the engine
                         Shape{2, 2, 8, 128, 1280, 1, {1100, 129}, false, false, 300},
                         Shape{1, 2, 4, 64, 640, 4, {600}, false, true, 50},
                         Shape{1, 1, 8, 64, 320, 9, {200}, true, false, 9}}) {
    kivi<T>(dtype, s, 2);
    kivi<T>(dtype, s, 4);
  }
}

// More (batch row, kv-head) blocks than a grid's y or z dimension holds (65535): the decode
// path, with scores, and the fp32 engine (test_attention_simt_engine) must still place them.
void wide_grid() {
  const Shape s{16400, 4, 4, 64, 4, 1, std::vector<int64_t>(16400, 3), false, false};
  dense<float>(DType::Float32, s, false);
  dense<float>(DType::Float32, s, true);
}

}  // namespace

int main() {
  require_device("attention_cuda");
  all_cases<float>(DType::Float32);
  all_cases<effx::Half>(DType::Float16);
  all_cases<effx::BFloat16>(DType::BFloat16);
  wide_grid();
  std::printf("attention_cuda: ok\n");
  return 0;
}
