"""Fake (meta) kernels for torch.ops.effx: shapes and dtypes only, for torch.compile and
FakeTensor tracing. The C++ library names this module as its Python module, so torch
imports it when an op is first used under tracing."""

import torch

from effx._shapes import quant_words_per_row


@torch.library.register_fake("effx::quantize")
def _quantize_fake(x, bits, group_size):
    torch._check(x.shape[-1] % group_size == 0, lambda: "effx.quantize: group_size must divide the last dim")
    lead = tuple(x.shape[:-1])
    codes = x.new_empty(lead + (quant_words_per_row(x.shape[-1], bits),), dtype=torch.int32)
    scale = x.new_empty(lead + (x.shape[-1] // group_size,))
    return codes, scale, torch.empty_like(scale)


@torch.library.register_fake("effx::dequantize")
def _dequantize_fake(codes, scale, zero, bits, group_size, dtype):
    return scale.new_empty(tuple(scale.shape[:-1]) + (scale.shape[-1] * group_size,), dtype=dtype)


def _attention_fake(q):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.register_fake("effx::dense_attention")
def _dense_attention_fake(q, k_new, v_new, k_cache, v_cache, lengths, new_lengths, parents, causal, sm_scale,
                          window=0):
    return _attention_fake(q)


@torch.library.register_fake("effx::kivi_attention")
def _kivi_attention_fake(q, k_new, v_new, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_res, v_res,
                         state, new_lengths, parents, bits, group_size, causal, sm_scale, window=0):
    return _attention_fake(q)


@torch.library.register_fake("effx::kivi_append_")
def _kivi_append_fake(k_new, v_new, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_res, v_res, state,
                      new_lengths, bits, group_size):
    return None


@torch.library.register_fake("effx::h2o_attention")
def _h2o_attention_fake(q, k_new, v_new, k_cache, v_cache, lengths, new_lengths, parents, scores, causal, sm_scale):
    return _attention_fake(q)


@torch.library.register_fake("effx::h2o_evict_")
def _h2o_evict_fake(k_cache, v_cache, scores, positions, state, heavy, recent):
    return None


# --- Monarch (SPECS.md section 6): x [..., k*p], w1 (k, q, p), w2 (l, s, r), l*r == k*q.


def _check_monarch_shapes(x, w1, w2, op):
    torch._check(w1.dim() == 3 and w2.dim() == 3, lambda: f"effx.{op}: w1 and w2 must be 3-D")
    torch._check(w2.shape[0] * w2.shape[2] == w1.shape[0] * w1.shape[1],
                 lambda: f"effx.{op}: w2 must have l * r == k * q")
    torch._check(x.shape[-1] == w1.shape[0] * w1.shape[2], lambda: f"effx.{op}: x must have last dim k * p")


@torch.library.register_fake("effx::monarch_matmul")
def _monarch_matmul_fake(x, w1, w2):
    _check_monarch_shapes(x, w1, w2, "monarch_matmul")
    return x.new_empty(tuple(x.shape[:-1]) + (w2.shape[0] * w2.shape[1],))


@torch.library.register_fake("effx::monarch_matmul_backward")
def _monarch_matmul_backward_fake(grad_out, x, w1, w2):
    _check_monarch_shapes(x, w1, w2, "monarch_matmul_backward")
    return x.new_empty(x.shape), w1.new_empty(w1.shape), w2.new_empty(w2.shape)


def _monarch_matmul_setup(ctx, inputs, output):
    x, w1, w2 = inputs
    ctx.save_for_backward(x, w1, w2)


def _monarch_matmul_grad(ctx, grad_out):
    x, w1, w2 = ctx.saved_tensors
    return torch.ops.effx.monarch_matmul_backward(grad_out, x, w1, w2)


torch.library.register_autograd("effx::monarch_matmul", _monarch_matmul_grad, setup_context=_monarch_matmul_setup)


# --- Pixelated butterfly (SPECS.md section 6): block-CSR matmul.


@torch.library.register_fake("effx::block_sparse_matmul")
def _block_sparse_matmul_fake(x, blocks, row_offsets, col_indices):
    torch._check(blocks.dim() == 3, lambda: "effx.block_sparse_matmul: blocks must be (nnz, block, block)")
    return x.new_empty(tuple(x.shape[:-1]) + ((row_offsets.shape[0] - 1) * blocks.shape[1],))


@torch.library.register_fake("effx::block_sparse_matmul_backward")
def _block_sparse_matmul_backward_fake(grad_out, x, blocks, row_offsets, col_indices):
    return x.new_empty(x.shape), blocks.new_empty(blocks.shape)


def _block_sparse_matmul_setup(ctx, inputs, output):
    x, blocks, row_offsets, col_indices = inputs
    ctx.save_for_backward(x, blocks, row_offsets, col_indices)


def _block_sparse_matmul_grad(ctx, grad_out):
    x, blocks, row_offsets, col_indices = ctx.saved_tensors
    grad_x, grad_blocks = torch.ops.effx.block_sparse_matmul_backward(grad_out, x, blocks, row_offsets, col_indices)
    return grad_x, grad_blocks, None, None


torch.library.register_autograd("effx::block_sparse_matmul", _block_sparse_matmul_grad,
                                setup_context=_block_sparse_matmul_setup)


# --- DejaVu contextual sparsity (SPECS.md section 4)


@torch.library.register_fake("effx::sparse_mlp_up")
def _sparse_mlp_up_fake(x, w_up, idx, activation="relu", w_gate=None, b_up=None, b_gate=None,
                        rows_per_index=1, check_indices=True):
    return x.new_empty((x.shape[0], idx.shape[-1] * rows_per_index))


@torch.library.register_fake("effx::sparse_mlp_down")
def _sparse_mlp_down_fake(h, w_down_t, idx, b_down=None, rows_per_index=1, check_indices=True):
    return h.new_empty((h.shape[0], w_down_t.shape[1]))


@torch.library.register_fake("effx::sparse_mlp")
def _sparse_mlp_fake(x, w_up, w_down_t, idx, activation="relu", w_gate=None, b_up=None, b_down=None,
                     b_gate=None, check_indices=True):
    return x.new_empty((x.shape[0], w_down_t.shape[1]))


# --- Tree speculative decoding (SPECS.md section 5): tokens [B, N], per-node rows [B, N + 1, ...].


@torch.library.register_fake("effx::sampling_probs")
def _sampling_probs_fake(logits, temperature, top_p):
    return logits.new_empty(logits.shape, dtype=torch.float32)


def _tree_result_fake(tokens):
    b, n = tokens.shape
    return tokens.new_empty(b, n), tokens.new_empty(b), tokens.new_empty(b)


@torch.library.register_fake("effx::tree_verify_greedy")
def _tree_verify_greedy_fake(tokens, parents, logits):
    return _tree_result_fake(tokens)


@torch.library.register_fake("effx::tree_verify_match")
def _tree_verify_match_fake(tokens, parents, target_tokens):
    return _tree_result_fake(tokens)


@torch.library.register_fake("effx::tree_verify_sample")
def _tree_verify_sample_fake(tokens, parents, target_probs, draft_probs, uniforms):
    return _tree_result_fake(tokens)
