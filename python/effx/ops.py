"""Typed wrappers of the torch.ops.effx operators.

Each function here calls exactly one operator; the math lives in the C++/CUDA kernels.
"""

from __future__ import annotations

import torch

__all__ = ["quantize", "dequantize"]


def quantize(x: torch.Tensor, bits: int = 2, group_size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise asymmetric quantization along the last dim (SPECS.md section 1).

    The last dim of ``x`` is split into groups of ``group_size`` consecutive values. Per
    group, ``scale = (max - min) / (2**bits - 1)`` and ``zero = min``; each value becomes the
    code ``round(clamp((x - zero) / scale, 0, 2**bits - 1))`` (round half to even), computed
    against the scale as stored. The scale is rounded up to the dtype of ``x``, so every value
    is within ``scale / 2`` of its dequantized value. A constant group stores ``scale = 0`` and
    codes 0, so it dequantizes exactly.

    Args:
        x: float32, float16 or bfloat16 tensor of shape ``[..., N]`` on CPU or CUDA; any
            strides (a copy is made only when the leading dims cannot be viewed as rows).
        bits: 2, 4 or 8.
        group_size: values per group; must divide ``N``.

    Returns:
        ``(codes, scale, zero)``: ``codes`` is int32 ``[..., ceil(N * bits / 32)]`` with the
        codes packed lowest bits first (value ``j`` at bits ``[bits*(j % (32//bits)), ...)``
        of word ``j // (32//bits)``); ``scale`` and ``zero`` are ``[..., N // group_size]`` in
        the dtype of ``x``.
    """
    return torch.ops.effx.quantize(x, bits, group_size)


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int = 2,
    group_size: int = 32,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Inverse of :func:`quantize`: ``code * scale + zero`` per group, computed in fp32.

    Args:
        codes: int32 ``[..., ceil(N * bits / 32)]`` as returned by :func:`quantize`.
        scale, zero: ``[..., N // group_size]``, float32/float16/bfloat16, same dtype.
        bits, group_size: as given to :func:`quantize`.
        dtype: output dtype (float32, float16 or bfloat16); defaults to ``scale.dtype``.

    Returns:
        Tensor ``[..., N]`` of ``dtype``.
    """
    return torch.ops.effx.dequantize(codes, scale, zero, bits, group_size, dtype or scale.dtype)
