"""Float64 reference of group-wise asymmetric quantization, written from SPECS.md section 1
(not from the kernels): per group of G consecutive values along the last dim,
scale = (max - min) / (2^b - 1) stored in the input dtype (rounded up, effx's documented
choice, so that no value is clamped), zero = min,
code = round(clamp((x - min) / scale, 0, 2^b - 1)), dequantized code * scale + min; a constant
group keeps scale 0 and codes 0 so it comes back exact. Codes are packed LSB-first into int32
words, each row starting on a new word."""

from __future__ import annotations

import torch

FP32_TINY = torch.finfo(torch.float32).tiny


def quantize_ref(x: torch.Tensor, bits: int, group_size: int):
    """Returns (codes int64 [..., N], unrounded codes float64 [..., N], scale, zero) with
    scale and zero float64 [..., N // group_size] (scale already rounded to x.dtype)."""
    qmax = 2**bits - 1
    groups = x.double().reshape(*x.shape[:-1], -1, group_size)
    mn = groups.amin(-1)
    mx = groups.amax(-1)
    exact = (mx - mn) / qmax
    scale = round_up(exact, x.dtype).double()
    scale = torch.where(scale >= FP32_TINY, scale, torch.zeros_like(scale))
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    v = ((groups - mn.unsqueeze(-1)) / safe.unsqueeze(-1)).clamp(0, qmax)
    v = torch.where(scale.unsqueeze(-1) > 0, v, torch.zeros_like(v))
    codes = torch.round(v).long()
    return codes.reshape(x.shape), v.reshape(x.shape), scale, mn


def round_up(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Smallest value of ``dtype`` >= v, for v >= 0."""
    t = v.to(dtype)
    int_type = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[dtype]
    bumped = (t.view(int_type) + 1).view(dtype)
    return torch.where(t.double() < v, bumped, t)


def dequantize_ref(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int):
    """Float64 code * scale + zero, codes unpacked [..., N]."""
    s = scale.double().repeat_interleave(group_size, -1)
    z = zero.double().repeat_interleave(group_size, -1)
    return codes.double() * s + z


def pack_ref(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unpacked codes [..., N] into int32 words [..., ceil(N / (32 // bits))]."""
    per_word = 32 // bits
    n = codes.shape[-1]
    words = -(-n // per_word)
    padded = torch.zeros(*codes.shape[:-1], words * per_word, dtype=torch.int64)
    padded[..., :n] = codes.long()
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    packed = (padded.reshape(*codes.shape[:-1], words, per_word) << shifts).sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_ref(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_ref: int32 words -> int64 codes [..., n]."""
    per_word = 32 // bits
    w = words.long() & 0xFFFFFFFF
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    codes = (w.unsqueeze(-1) >> shifts) & (2**bits - 1)
    return codes.reshape(*words.shape[:-1], -1)[..., :n]


def quantize_like_effx(x: torch.Tensor, bits: int, group_size: int):
    """The same quantization with effx's documented arithmetic (include/effx/quant.h): scale
    from the fp32 range divided in fp32 and rounded up to x.dtype, codes as
    round_half_even((x - min) * (1 / scale)) in fp32. Returns float64 dequantized values, so
    references built on it agree with the kernels to fp32 rounding instead of up to one
    quantization step at rounding ties."""
    qmax = 2**bits - 1
    groups = x.float().reshape(*x.shape[:-1], -1, group_size)
    mn = groups.amin(-1, keepdim=True)
    mx = groups.amax(-1, keepdim=True)
    scale = round_up_from_fp32((mx - mn) / qmax, x.dtype).float()
    usable = scale >= FP32_TINY
    scale = torch.where(usable, scale, torch.zeros_like(scale))
    inv = torch.where(usable, 1.0 / torch.where(usable, scale, torch.ones_like(scale)), torch.zeros_like(scale))
    codes = ((groups - mn) * inv).clamp(0, qmax).round()
    return (codes.double() * scale.double() + mn.double()).reshape(x.shape)


def round_up_from_fp32(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Smallest value of ``dtype`` >= v (v fp32, >= 0)."""
    if dtype == torch.float32:
        return v
    t = v.to(dtype)
    bumped = (t.view(torch.int16) + 1).view(dtype)
    return torch.where(t.float() < v, bumped, t)
