// effx C++ test: the CUDA H2O eviction keeps the same tokens as the CPU one (per batch row and
// kv-head: the `recent` newest and the `heavy` best-scoring others, the older first among equal
// scores), with their K/V rows, scores and positions; rows under the budget stay as they are.
// Slots may be filled in another order, so the slots are compared as sets keyed by position.
// Runs on a GPU, or on the SIMT emulator (test_h2o_simt); exits 77 (ctest: skipped) when
// neither is there.
#include <algorithm>
#include <cstdio>
#include <numeric>
#include <random>
#include <tuple>
#include <vector>

#include "check.h"
#include "cuda_buffers.h"
#include "effx/h2o.h"
#include "effx/h2o_cuda.h"

namespace {

struct Layer {
  std::vector<float> k, v, scores;
  std::vector<int64_t> positions, state;
};

// (position, score, first element of K, of V) of every held slot of (b, h), by position.
std::vector<std::tuple<int64_t, float, float, float>> held(const Layer& l, int64_t b, int64_t h, int64_t H, int64_t C,
                                                            int64_t D) {
  std::vector<std::tuple<int64_t, float, float, float>> out;
  const int64_t row = b * H + h;
  for (int64_t i = 0; i < l.state[b * 2]; ++i) {
    out.emplace_back(l.positions[row * C + i], l.scores[row * C + i], l.k[(row * C + i) * D], l.v[(row * C + i) * D + D - 1]);
  }
  std::sort(out.begin(), out.end());
  return out;
}

void compare(int64_t B, int64_t H, int64_t C, int64_t D, int64_t heavy, int64_t recent, unsigned seed) {
  std::mt19937 rng(seed);
  Layer l{std::vector<float>(B * H * C * D), {}, std::vector<float>(B * H * C), std::vector<int64_t>(B * H * C),
          std::vector<int64_t>(B * 2)};
  std::normal_distribution<float> dist;
  for (auto& x : l.k) x = dist(rng);
  l.v = l.k;
  std::reverse(l.v.begin(), l.v.end());
  for (auto& x : l.scores) x = static_cast<float>(rng() % 8) / 4.0f;  // many ties
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = b == B - 1 ? std::min(C, heavy + recent) : C - static_cast<int64_t>(rng() % (C / 2));
    l.state[b * 2] = n;
    l.state[b * 2 + 1] = n + static_cast<int64_t>(rng() % 5);  // some tokens were evicted before
    for (int64_t h = 0; h < H; ++h) {
      std::vector<int64_t> pos(n);
      std::iota(pos.begin(), pos.end(), l.state[b * 2 + 1] - n);
      std::shuffle(pos.begin(), pos.end(), rng);
      std::copy(pos.begin(), pos.end(), l.positions.begin() + (b * H + h) * C);
    }
  }
  Layer want = l;
  effx::cpu::h2o_evict(effx::H2OStorage{B, H, D, C, want.k.data(), want.v.data(), H * C * D, C * D, D,
                                        want.scores.data(), want.positions.data(), want.state.data()},
                       effx::DType::Float32, heavy, recent, 2);
  float *dk = to_device(l.k), *dv = to_device(l.v), *ds = to_device(l.scores);
  int64_t *dp = to_device(l.positions), *dst = to_device(l.state);
  const effx::H2OStorage s{B, H, D, C, dk, dv, H * C * D, C * D, D, ds, dp, dst};
  char* ws = to_device(std::vector<char>(effx::cuda::h2o_evict_workspace_bytes(s)));
  CUDA_OK(effx::cuda::h2o_evict(s, effx::DType::Float32, heavy, recent, ws, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  const Layer got{to_host(dk, l.k.size()), to_host(dv, l.v.size()), to_host(ds, l.scores.size()),
                  to_host(dp, l.positions.size()), to_host(dst, l.state.size())};
  EFFX_EXPECT(got.state == want.state, "h2o evict: state differs");
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      EFFX_EXPECT(held(got, b, h, H, C, D) == held(want, b, h, H, C, D),
                  "h2o evict heavy=%lld recent=%lld: row %lld head %lld keeps other tokens", (long long)heavy,
                  (long long)recent, (long long)b, (long long)h);
    }
  }
  for (void* p : {(void*)dk, (void*)dv, (void*)ds, (void*)dp, (void*)dst, (void*)ws}) CUDA_OK(cudaFree(p));
}

}  // namespace

int main() {
  require_device("h2o_cuda");
  compare(3, 2, 100, 8, 20, 10, 1);
  compare(2, 3, 700, 4, 100, 37, 2);  // more tokens than a block's threads
  compare(2, 1, 64, 4, 0, 16, 3);     // recent only
  compare(1, 2, 50, 4, 25, 0, 4);     // heavy only
  compare(0, 2, 16, 4, 4, 4, 5);      // an empty batch: nothing to launch
  std::printf("h2o_cuda: ok\n");
  return 0;
}
