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
