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
def _dense_attention_fake(q, k_new, v_new, k_cache, v_cache, lengths, new_lengths, parents, causal, sm_scale):
    return _attention_fake(q)


@torch.library.register_fake("effx::kivi_attention")
def _kivi_attention_fake(q, k_new, v_new, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_res, v_res,
                         state, new_lengths, parents, bits, group_size, causal, sm_scale):
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
