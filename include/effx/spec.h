// effx family: tree speculative decoding, verification of a drafted token tree (SPECS.md
// section 5) and the sampling distribution it uses.
//
// Layout: a batch of B trees of N nodes each, every array contiguous.
//   tokens  [B, N] int64: node i's token; a negative token marks an empty node (never accepted).
//   parents [B or 1, N] int64 (batch stride parents_sb, 0 for one tree shared by the batch):
//           parents[i] < i, -1 for children of the root (the last prefix token).
//   per-node rows [B, N + 1, V]: row 0 belongs to the root, row i + 1 to node i.
// Children of a node are tried in index order (the k-th child is the k-th draw). Results per
// batch row: accepted [B, N] (node indices along the accepted path, then -1), num_accepted [B]
// and bonus [B] (the token the target emits after the last accepted node).
#pragma once

#include <cstdint>

#include "effx/dtype.h"

namespace effx {

struct TreeArgs {
  int64_t batch, nodes, vocab;
  const int64_t* tokens;
  const int64_t* parents;
  int64_t parents_sb;
  int64_t* accepted;
  int64_t* num_accepted;
  int64_t* bonus;
};

namespace cpu {

// probs[r] = softmax(logits[r] / temperature) restricted to the top-p nucleus: the tokens whose
// probability is at least tau, where tau is the largest probability such that the tokens at or
// above it hold mass >= top_p (ties at tau kept), renormalized. top_p >= 1 keeps everything.
// logits [rows, V] of dtype, probs [rows, V] fp32.
void sampling_probs(const void* logits, DType dtype, int64_t rows, int64_t vocab, float temperature,
                    float top_p, float* probs, int num_threads);

// Greedy: from the root, accept the first child whose token is the argmax (lowest index on
// ties) of the target logits at the current node; bonus = that argmax at the last accepted
// node. logits [B, N + 1, V] of dtype.
void verify_greedy(const TreeArgs& t, const void* logits, DType dtype, int num_threads);

// SpecExec: the target sampled one token per node (target_tokens [B, N + 1]); accept the path
// whose every token equals the target's sample at its parent; bonus = the sample at its end.
void verify_match(const TreeArgs& t, const int64_t* target_tokens, int num_threads);

// Exact multi-draft sampling (SpecInfer / Sequoia). At a node with target distribution p and
// draft distribution q (target_probs, draft_probs [B, N + 1, V] fp32; the node's children were
// drawn from q without replacement), child x (node j) is accepted when
// uniforms[b, j + 1] * q(x) < p(x), i.e. with probability min(1, p(x) / q(x)). On rejection
// p <- normalize(max(p - q, 0)) (the original p when that is all zero) and x is removed from q
// (renormalized). When every child is rejected, or the node is a leaf, the bonus token is
// drawn from p by inverse CDF with uniforms[b, 0]. uniforms [B, N + 1] in [0, 1).
void verify_sample(const TreeArgs& t, const float* target_probs, const float* draft_probs,
                   const float* uniforms, int num_threads);

}  // namespace cpu
}  // namespace effx
