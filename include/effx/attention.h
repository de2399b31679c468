// effx: fused attention of a step's queries over a KV cache plus the step's new tokens, with
// one softmax over both. Shared by every cache policy: the cached tokens come from a policy
// (plain K/V here, KIVI's quantized + residual storage in kivi.h); the new tokens are given.
//
// Layout everywhere: [batch, heads, tokens, head_dim] with head_dim contiguous; other dims by
// strides (in elements). GQA: query head h reads kv-head h / (q_heads / kv_heads).
// Query i of row b sits at position lengths[b] + i. It sees every cached token and, among the
// new tokens: all of them (causal = false), those j <= i (causal = true), or its ancestors
// and itself in the tree given by `parents` (parents[i] < i, -1 for children of the last
// cached token). Queries i >= new_lengths[b] are padding: their output is 0, their LSE -inf.
// A sliding window W > 0 (Mistral, Qwen2, HF "sliding_attention" layers; causal, no tree, no
// scoring) hides every token at position t <= p - W from the query at position p, cached
// token t sitting at position t.
#pragma once

#include <cstdint>

#include "effx/dtype.h"

namespace effx {

struct Strided {
  const void* data;
  int64_t sb, sh, st;  // strides of batch, head, token (head_dim is contiguous)
};

struct AttentionArgs {
  int64_t batch, q_heads, kv_heads, q_len, head_dim;
  Strided q;                    // [B, Hq, Tq, D]
  Strided k_new, v_new;         // [B, Hkv, Tq, D]: the step's new tokens
  void* out;                    // [B, Hq, Tq, D] contiguous
  float* lse;                   // [B, Hq, Tq] contiguous natural-log sum-exp, or nullptr
  const int64_t* lengths;       // [B] tokens cached before this step, row b at b * lengths_stride
  int64_t lengths_stride;
  const int64_t* new_lengths;   // [B] valid new tokens per row, or nullptr (all q_len)
  const int64_t* parents;       // tree parents [B or 1, q_len], or nullptr
  int64_t parents_sb;           // batch stride of parents (0: one tree for the batch)
  bool causal;
  float sm_scale;
  int64_t max_cached;           // upper bound of lengths[b] (the cache capacity), for planning
  // H2O scoring (optional): scores [B, Hkv, >= lengths[b] + new tokens] fp32, row (b, h) at
  // b * scores_sb + h * scores_sh. Cached token t gains the sum over the group's query heads
  // and the step's queries of its attention probability; new token j's entry n + j is set
  // to that sum.
  float* scores;
  int64_t scores_sb, scores_sh;
  int64_t window = 0;           // sliding window in tokens, 0 for none
};

// Plain cached K/V: k, v [B, Hkv, capacity, D] with the given strides (shared by k and v).
struct DenseKV {
  const void* k;
  const void* v;
  int64_t sb, sh, st;
};

namespace cpu {
void dense_attention(const AttentionArgs& a, const DenseKV& kv, DType dtype, int num_threads);
}  // namespace cpu

}  // namespace effx
