// effx family: H2O heavy-hitter KV eviction (SPECS.md section 3), torch-free API.
//
// Storage of one layer: plain K/V [B, H, C, D] (DenseKV strides, shared by k and v), and
//   scores    [B, H, C] fp32   accumulated attention probability of the token in each slot
//   positions [B, H, C] int64  token index (0, 1, ... in the row's stream) of each slot
//   state     [B, 2]    int64  per row: (held slots, tokens seen)
// Slots [0, held) are occupied, in no particular order: eviction moves the tail's survivors
// into the evicted slots (O(evicted) row moves per step). Scores come from the dense
// attention kernels with AttentionArgs::scores set (attention.h).
#pragma once

#include <cstdint>

#include "effx/attention.h"

namespace effx {

struct H2OStorage {
  int64_t batch, heads, head_dim, capacity;
  void* k;
  void* v;
  int64_t sb, sh, st;
  float* scores;
  int64_t* positions;
  int64_t* state;
};

namespace cpu {

// Per (row, kv-head) holding more than heavy + recent tokens: keep the `recent` newest
// (positions >= seen - recent) and the `heavy` highest-scoring others; among equal scores the
// older token goes first. K, V, scores and positions move together; held becomes heavy + recent.
void h2o_evict(const H2OStorage& s, DType dtype, int64_t heavy, int64_t recent, int num_threads);

}  // namespace cpu
}  // namespace effx
