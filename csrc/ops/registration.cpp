// effx: every operator schema in one place. Implementations register per backend in
// csrc/ops/<family>.cpp (CPU) and csrc/ops/cuda/<family>.cpp (CUDA); fake kernels for
// torch.compile live in python/effx/_meta.py, which torch imports on first use.
#include <torch/library.h>

TORCH_LIBRARY(effx, m) {
  m.set_python_module("effx._meta");

  // Group-wise asymmetric quantization (SPECS.md section 1).
  m.def("quantize(Tensor x, int bits, int group_size) -> (Tensor codes, Tensor scale, Tensor zero)");
  m.def(
      "dequantize(Tensor codes, Tensor scale, Tensor zero, int bits, int group_size, "
      "ScalarType dtype) -> Tensor");

  // Fused attention over a KV cache plus the step's new tokens, one softmax over both
  // (include/effx/attention.h), with an optional sliding window (0: none). Returns
  // (out [B, Hq, Tq, D], lse [B, Hq, Tq] fp32).
  m.def(
      "dense_attention(Tensor q, Tensor k_new, Tensor v_new, Tensor k_cache, Tensor v_cache, "
      "Tensor lengths, Tensor? new_lengths, Tensor? parents, bool causal, float sm_scale, "
      "int window=0) -> (Tensor out, Tensor lse)");

  // H2O heavy hitters (SPECS.md section 3; storage in include/effx/h2o.h): dense attention that
  // also accumulates each cached token's attention probability into `scores`, and eviction.
  m.def(
      "h2o_attention(Tensor q, Tensor k_new, Tensor v_new, Tensor k_cache, Tensor v_cache, "
      "Tensor lengths, Tensor? new_lengths, Tensor? parents, Tensor(a!) scores, bool causal, "
      "float sm_scale) -> (Tensor out, Tensor lse)");
  m.def(
      "h2o_evict_(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!) scores, Tensor(d!) positions, "
      "Tensor(e!) state, int heavy, int recent) -> ()");

  // KIVI 2/4-bit KV cache (SPECS.md section 2; storage layout in include/effx/kivi.h).
  m.def(
      "kivi_attention(Tensor q, Tensor k_new, Tensor v_new, Tensor k_codes, Tensor k_scale, "
      "Tensor k_zero, Tensor v_codes, Tensor v_scale, Tensor v_zero, Tensor k_res, Tensor v_res, "
      "Tensor state, Tensor? new_lengths, Tensor? parents, int bits, int group_size, bool causal, "
      "float sm_scale, int window=0) -> (Tensor out, Tensor lse)");
  m.def(
      "kivi_append_(Tensor k_new, Tensor v_new, Tensor(a!) k_codes, Tensor(b!) k_scale, "
      "Tensor(c!) k_zero, Tensor(d!) v_codes, Tensor(e!) v_scale, Tensor(f!) v_zero, "
      "Tensor(g!) k_res, Tensor(h!) v_res, Tensor(i!) state, Tensor? new_lengths, int bits, "
      "int group_size) -> ()");

  // Tree speculative decoding (SPECS.md section 5; layout in include/effx/spec.h): tokens
  // [B, N], parents [N] or [B, N], per-node rows [B, N + 1, ...] (row 0 at the root). Each
  // verification returns (accepted [B, N] node indices then -1, num_accepted [B], bonus [B]).
  m.def("sampling_probs(Tensor logits, float temperature, float top_p) -> Tensor");
  m.def(
      "tree_verify_greedy(Tensor tokens, Tensor parents, Tensor logits) "
      "-> (Tensor accepted, Tensor num_accepted, Tensor bonus)");
  m.def(
      "tree_verify_match(Tensor tokens, Tensor parents, Tensor target_tokens) "
      "-> (Tensor accepted, Tensor num_accepted, Tensor bonus)");
  m.def(
      "tree_verify_sample(Tensor tokens, Tensor parents, Tensor target_probs, Tensor draft_probs, "
      "Tensor uniforms) -> (Tensor accepted, Tensor num_accepted, Tensor bonus)");

  // Monarch structured matrices (SPECS.md section 6): x [..., k*p], w1 (k, q, p), w2 (l, s, r).
  m.def("monarch_matmul(Tensor x, Tensor w1, Tensor w2) -> Tensor");
  m.def(
      "monarch_matmul_backward(Tensor grad_out, Tensor x, Tensor w1, Tensor w2) -> "
      "(Tensor grad_x, Tensor grad_w1, Tensor grad_w2)");

  // Pixelated butterfly (SPECS.md section 6): block-CSR matmul, x [..., C*block],
  // blocks (nnz, block, block), row_offsets [R + 1], col_indices [nnz] (int64).
  m.def("block_sparse_matmul(Tensor x, Tensor blocks, Tensor row_offsets, Tensor col_indices) -> Tensor");
  m.def(
      "block_sparse_matmul_backward(Tensor grad_out, Tensor x, Tensor blocks, Tensor row_offsets, "
      "Tensor col_indices) -> (Tensor grad_x, Tensor grad_blocks)");

  // DejaVu contextual sparsity (SPECS.md section 4): gathered up/gate projection with fused
  // bias and activation, and the down projection over the transposed weight [n, d].
  m.def(
      "sparse_mlp_up(Tensor x, Tensor w_up, Tensor idx, str activation=\"relu\", "
      "Tensor? w_gate=None, Tensor? b_up=None, Tensor? b_gate=None, int rows_per_index=1, "
      "bool check_indices=True) -> Tensor");
  m.def(
      "sparse_mlp_down(Tensor h, Tensor w_down_t, Tensor idx, Tensor? b_down=None, "
      "int rows_per_index=1, bool check_indices=True) -> Tensor");
  // Both projections in one call: h = act(x W1[idx]^T + b1[idx]) (gated with w_gate), then
  // y = h W2t[idx] + b2.
  m.def(
      "sparse_mlp(Tensor x, Tensor w_up, Tensor w_down_t, Tensor idx, str activation=\"relu\", "
      "Tensor? w_gate=None, Tensor? b_up=None, Tensor? b_down=None, Tensor? b_gate=None, "
      "bool check_indices=True) -> Tensor");
}
