"""Float64 reference of cache attention (SPECS.md sections 2 and 8): one softmax over the
cached tokens plus the new ones; new tokens causal among themselves or following a tree; an
optional sliding window over positions (cached token t at position t)."""

from __future__ import annotations

import torch


def visible_new(tn: int, causal: bool = True, parents: list[int] | None = None) -> torch.Tensor:
    """[tn, tn] bool: may new query i see new token j?"""
    if parents is not None:
        mask = torch.zeros(tn, tn, dtype=torch.bool)
        for i in range(tn):
            j = i
            while j >= 0:
                mask[i, j] = True
                j = parents[j]
        return mask
    if causal:
        return torch.ones(tn, tn, dtype=torch.bool).tril()
    return torch.ones(tn, tn, dtype=torch.bool)


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_cached: int, sm_scale: float,
                  causal: bool = True, parents: list[int] | None = None, window: int = 0):
    """One batch row. q [Hq, tn, D]; k, v [Hkv, n_cached + tn, D] (cached then new); with a
    window, query i (position n_cached + i) sees positions > n_cached + i - window only.
    Returns (out [Hq, tn, D], lse [Hq, tn]) in float64."""
    hq, tn, _ = q.shape
    group = hq // k.shape[0]
    k = k.double().repeat_interleave(group, 0)
    v = v.double().repeat_interleave(group, 0)
    scores = q.double() @ k.transpose(1, 2) * sm_scale
    mask = torch.ones(tn, n_cached + tn, dtype=torch.bool)
    mask[:, n_cached:] = visible_new(tn, causal, parents)
    if window:
        positions = torch.arange(n_cached + tn)
        mask &= positions[None, :] > (n_cached + torch.arange(tn))[:, None] - window
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    return torch.softmax(scores, -1) @ v, lse
