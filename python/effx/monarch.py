"""Monarch structured matrices (SPECS.md section 6): the fused multiply and the projection of a
dense matrix onto Monarch factors, in the one layout both use.

A Monarch matrix is ``P2 B2 P1 B1``: ``w1`` of shape ``(k, q, p)`` holds the k diagonal blocks
of ``B1`` and ``w2`` of shape ``(l, s, r)`` those of ``B2`` (``l * r == k * q``); ``P1`` views the
intermediate (length ``k * q``) as ``(r, l)`` and transposes it, ``P2`` views the output as
``(l, s)`` and transposes it. The permutations are strides inside the kernels, never index
tensors.
"""

from __future__ import annotations

import math

import torch

from effx.ops import monarch_matmul

__all__ = ["monarch_matmul", "project", "factor_shapes"]


def factor_shapes(in_features: int, out_features: int, nblocks: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Shapes ``(w1, w2)`` that effx uses for a ``[out_features, in_features]`` matrix with
    ``nblocks`` blocks per factor: ``w1 (nblocks, q, in/nblocks)``, ``w2 (nblocks, out/nblocks, q)``
    with ``q = min(in/nblocks, out/nblocks)``. Both sizes must be multiples of ``nblocks``."""
    if nblocks < 1:
        raise ValueError(f"effx.monarch: nblocks must be positive, got {nblocks}")
    for name, size in (("in_features", in_features), ("out_features", out_features)):
        if size < 1 or size % nblocks != 0:
            raise ValueError(f"effx.monarch: {name} ({size}) must be a positive multiple of nblocks ({nblocks})")
    p, s = in_features // nblocks, out_features // nblocks
    q = min(p, s)
    return (nblocks, q, p), (nblocks, s, q)


def project(dense: torch.Tensor, nblocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Closest Monarch matrix to ``dense`` in Frobenius norm, as factors ``(w1, w2)``.

    ``dense`` is ``[out, in]`` like ``nn.Linear.weight``; the result satisfies
    ``monarch_matmul(x, w1, w2) ~= x @ dense.T`` with the shapes of :func:`factor_shapes`, and
    is exact when ``dense`` is itself Monarch with those shapes.

    Why it is exact and optimal: output rows ``d*l + j`` and input columns ``i*p + b`` meet only
    through the intermediate entries ``m`` with ``m // q == i`` and ``m % l == j``; each such
    ``m`` contributes one outer product ``w2[j, :, m // l] w1[i, m % q, :]``, and no parameter is
    shared between two ``(i, j)`` blocks. So block ``(i, j)`` of ``dense`` (``s x p``) is free
    up to rank ``R_ij`` = the number of those ``m``, and its best approximation is the truncated
    SVD (Eckart-Young), with ``sqrt(sigma)`` split into both factors.
    """
    if dense.dim() != 2:
        raise ValueError(f"effx.monarch.project: dense must be 2-D [out, in], got shape {list(dense.shape)}")
    out_features, in_features = dense.shape
    (k, q, p), (l, s, r) = factor_shapes(in_features, out_features, nblocks)
    work = dense.detach().to(torch.float64 if dense.dtype == torch.float64 else torch.float32)
    # blocks[i, j, d, b] = dense[d*l + j, i*p + b]
    blocks = work.reshape(s, l, k, p).permute(2, 1, 0, 3)
    u, sigma, vh = torch.linalg.svd(blocks, full_matrices=False)
    root = sigma.sqrt()
    u = u * root.unsqueeze(-2)  # [k, l, s, R]
    vh = vh * root.unsqueeze(-1)  # [k, l, R, p]

    m = torch.arange(k * q, device=dense.device)
    i, a, j, c = m // q, m % q, m % l, m // l
    # rank slot of m within its (i, j) block: the m of one block are l apart
    slot = (m - i * q - (j - i * q) % l) // l
    keep = slot < sigma.shape[-1]
    slot = slot.clamp(max=sigma.shape[-1] - 1)
    w1 = torch.zeros(k, q, p, dtype=work.dtype, device=dense.device)
    w2 = torch.zeros(l, s, r, dtype=work.dtype, device=dense.device)
    w1[i[keep], a[keep]] = vh[i[keep], j[keep], slot[keep]]
    w2[j[keep], :, c[keep]] = u[i[keep], j[keep], :, slot[keep]]
    return w1.to(dense.dtype), w2.to(dense.dtype)


def dense_of(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The ``[l*s, k*p]`` dense matrix that ``(w1, w2)`` multiplies by (for inspection)."""
    eye = torch.eye(w1.shape[0] * w1.shape[2], dtype=w1.dtype, device=w1.device)
    return monarch_matmul(eye, w1, w2).T


def monarch_demo_row(device: torch.device) -> str:
    """One ``effx demo`` row: a MonarchLinear (16 blocks) projected from a 4096 x 4096 dense
    projection whose weight is low-rank-plus-noise like a trained one, against nn.Linear."""
    from effx.bench.harness import median_time
    from effx.nn import MonarchLinear

    gen = torch.Generator(device="cpu").manual_seed(0)
    n, tokens, nblocks = 4096, 1024 if device.type == "cpu" else 16384, 16
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    # A Monarch matrix plus 10% noise: the projection recovers the structured part.
    w1 = torch.randn(nblocks, n // nblocks, n // nblocks, generator=gen) / math.sqrt(n // nblocks)
    w2 = torch.randn(nblocks, n // nblocks, n // nblocks, generator=gen) / math.sqrt(n // nblocks)
    weight = dense_of(w1, w2)
    weight += 0.1 * weight.std() * torch.randn(n, n, generator=gen)
    dense = torch.nn.Linear(n, n, bias=False)
    with torch.no_grad():
        dense.weight.copy_(weight)
    dense = dense.to(device=device, dtype=dtype)
    mon = MonarchLinear.from_linear(dense, nblocks)
    x = torch.randn(tokens, n, generator=gen).to(device=device, dtype=dtype)
    with torch.no_grad():
        want, got = dense(x), mon(x)
        err = ((got.double() - want.double()).norm() / want.double().norm()).item()
        t_dense = median_time(lambda: dense(x), device, runs=10)
        t_mon = median_time(lambda: mon(x), device, runs=10)
    params = sum(t.numel() for t in mon.parameters())
    return (f"{'MonarchLinear 16 blocks':<26} {params * x.element_size():>11,} "
            f"{n * n / params:>7.2f}x {err:>11.2e} {t_mon * 1e3:>9.3f} {t_dense * 1e3:>11.3f}")
