// effx family: H2O eviction, CPU kernel (storage layout in include/effx/h2o.h).
#include "effx/h2o.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace effx {
namespace cpu {
namespace {

void evict_head(const H2OStorage& s, int64_t elem, int64_t b, int64_t h, int64_t heavy, int64_t recent,
                std::vector<int64_t>& candidates, std::vector<char>& victim) {
  const int64_t n = s.state[b * 2], seen = s.state[b * 2 + 1];
  const int64_t budget = heavy + recent;
  if (n <= budget) return;
  float* scores = s.scores + (b * s.heads + h) * s.capacity;
  int64_t* pos = s.positions + (b * s.heads + h) * s.capacity;
  candidates.clear();
  for (int64_t i = 0; i < n; ++i) {
    if (pos[i] < seen - recent) candidates.push_back(i);
  }
  // Victims: the n - budget lowest (score, position) pairs among the non-recent tokens.
  const int64_t evict = n - budget;
  auto lower = [&](int64_t x, int64_t y) { return scores[x] < scores[y] || (scores[x] == scores[y] && pos[x] < pos[y]); };
  std::nth_element(candidates.begin(), candidates.begin() + evict, candidates.end(), lower);
  victim.assign(n, 0);
  for (int64_t i = 0; i < evict; ++i) victim[candidates[i]] = 1;
  // Survivors past the budget fill the victims' slots below it, both in slot order.
  char* k = static_cast<char*>(s.k) + (b * s.sb + h * s.sh) * elem;
  char* v = static_cast<char*>(s.v) + (b * s.sb + h * s.sh) * elem;
  const size_t row_bytes = s.head_dim * elem;
  int64_t hole = 0;
  for (int64_t from = budget; from < n; ++from) {
    if (victim[from]) continue;
    while (!victim[hole]) ++hole;
    std::memcpy(k + hole * s.st * elem, k + from * s.st * elem, row_bytes);
    std::memcpy(v + hole * s.st * elem, v + from * s.st * elem, row_bytes);
    scores[hole] = scores[from];
    pos[hole] = pos[from];
    ++hole;
  }
}

}  // namespace

void h2o_evict(const H2OStorage& s, DType dtype, int64_t heavy, int64_t recent, int num_threads) {
  const int64_t elem = dtype_size(dtype);
#pragma omp parallel num_threads(std::max(1, num_threads))
  {
    std::vector<int64_t> candidates;
    std::vector<char> victim;
#pragma omp for schedule(dynamic, 1)
    for (int64_t bh = 0; bh < s.batch * s.heads; ++bh) {
      evict_head(s, elem, bh / s.heads, bh % s.heads, heavy, recent, candidates, victim);
    }
  }
  for (int64_t b = 0; b < s.batch; ++b) s.state[b * 2] = std::min(s.state[b * 2], heavy + recent);
}

}  // namespace cpu
}  // namespace effx
